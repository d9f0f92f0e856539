"""`python -m search.bench_ops [--batch 16,32] [--write docs/benchmarks.md]`

Every kernel-backend op (blocks/liger.py) at the shapes it has inside GPT-2 124M / Llama at
T = 1024: forward + backward of the eager twin, the twin compiled by torch.compile (what a
compiled model runs, before Inductor fuses it with its neighbours) and Liger's kernel, under
bf16 autocast, best of `--reps` calls after a warm-up. The last column is what `impl: auto`
decides for a compiled model (Liger only where it beats the compiled twin). On CPU it runs at
tiny shapes without Liger so CI keeps it working; numbers there mean nothing.
"""
from __future__ import annotations

import argparse
import sys

import torch

from blocks import liger, twins


def cases(batch: int, seq: int, d: int, heads: int, d_ff: int, vocab: int, device) -> list:
    """(op, shape label, args) with the dtypes the ops see in a bf16-autocast model step."""
    n, dh, bf = batch * seq, d // heads, torch.bfloat16

    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)
    cos, sin = (t(seq, dh, dtype=bf, grad=False) for _ in "cs")
    ids = torch.randint(0, vocab, (n,), device=device)
    return [
        ("rms_norm", f"{batch}x{seq}x{d} fp32", (t(batch, seq, d), t(d), 1e-6)),
        ("layer_norm", f"{batch}x{seq}x{d} fp32", (t(batch, seq, d), t(d), t(d), 1e-5)),
        ("rope", f"q, k {batch}x{heads}x{seq}x{dh} bf16",
         (t(batch, heads, seq, dh, dtype=bf), t(batch, heads, seq, dh, dtype=bf), cos, sin)),
        ("swiglu", f"{batch}x{seq}x{d_ff} bf16", (t(batch, seq, d_ff, dtype=bf), t(batch, seq, d_ff, dtype=bf))),
        ("geglu", f"{batch}x{seq}x{d_ff} bf16", (t(batch, seq, d_ff, dtype=bf), t(batch, seq, d_ff, dtype=bf))),
        ("cross_entropy", f"{n}x{vocab} bf16 logits", (t(n, vocab, dtype=bf), ids, -1)),
        ("linear_cross_entropy", f"{n}x{d} -> {vocab}", (t(n, d), t(vocab, d), ids, -1, 4096)),
    ]


def measure(batches, reps: int, device, size: dict) -> list[dict]:
    rows = []
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    for batch in batches:
        for op, shape, args in cases(batch, device=device, **size):
            with autocast:
                row = {"op": op, "shape": shape,
                       "eager_ms": liger._time(twins.TWINS[op], args, reps) * 1e3,
                       "compiled_ms": liger._time(liger._compiled_twin(op), args, reps) * 1e3,
                       "liger_ms": None}
                if liger.can_run(device):
                    row["liger_ms"] = liger._time(liger.LIGER[op], args, reps) * 1e3
            faster = (row["liger_ms"] is not None and row["liger_ms"] < row["compiled_ms"]
                      and op in liger.RUN_OUTSIDE_REGIONS)   # auto's rule for compiled models
            rows.append({**row, "auto": "liger" if faster else "torch"})
            torch._dynamo.reset()   # each shape compiles afresh: no recompile limit across batches
    return rows


def table(rows, meta) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3f}"
    lines = [f"### {meta['title']}", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']}; torch {meta['torch']}; {meta['date']}", "",
             "| op | shape | twin eager ms | twin compiled ms | Liger ms | Liger vs compiled twin | auto (compiled model) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["liger_ms"] is None else f"{r['compiled_ms'] / r['liger_ms']:.2f}x"
        lines.append(f"| {r['op']} | {r['shape']} | {ms(r['eager_ms'])} | {ms(r['compiled_ms'])} | "
                     f"{ms(r['liger_ms'])} | {ratio} | {r['auto']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m search.bench_ops")
    ap.add_argument("--batch", default=None, help="comma list (default 16,32 on GPU, 1 on CPU)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--write", help="append the table to this markdown file")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = (dict(seq=1024, d=768, heads=12, d_ff=2048, vocab=50304) if device.type == "cuda"
            else dict(seq=16, d=32, heads=4, d_ff=64, vocab=100))
    batches = [int(b) for b in (a.batch or ("16,32" if device.type == "cuda" else "1")).split(",")]
    rows = measure(batches, a.reps, device, size)
    from search.bench import publish, run_meta
    publish(table(rows, run_meta("search.bench_ops", "Kernel backends, op by op", argv, device)), a.write)
    return 0

if __name__ == "__main__":
    sys.exit(main())
