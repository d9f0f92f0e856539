"""`python -m bench.hc_kernels [--tokens 16384] [--streams 4] [--dim 768]`: one hyper-connection
(hc_read and hc_write, static and dynamic), forward + backward, as the compiled torch block and as
our fused kernels (blocks/hyper_kernels.py) under several launch settings; ms per call (forward +
backward, and the forward alone) and the share of the HBM floor (the bytes one fused pass per
direction must move, at 3.35 TB/s). A table on stdout, with each setting's error against the eager
torch block (y and dy are bf16: 4e-3 is one bf16 rounding). GPU only."""
from __future__ import annotations

import argparse
import itertools

import torch

import blocks
from blocks import hyper_kernels as hk
from blocks.kinds import hidden, streams
from blocks.registry import Context

HBM = 3.35e12   # H100 SXM's HBM3 bandwidth, bytes/s
# The first four were timed in run 10 (docs/benchmarks.md); the others, untimed yet, have fewer
# tokens or fewer warps a program (python -m bench.hc_sass: one warp leaves almost no barriers),
# or whole rows: a chunk of 1024 covers d = 768, so each pass over d is one load of a token's
# streams (the second meant to hit L1), as Liger's norm kernels do with one row a program; no spills.
SETTINGS = [dict(tile=t, chunk=c, warps_fwd=wf, warps_bwd=wb)
            for t, c, wf, wb in [(1024, 128, 4, 4), (1024, 128, 4, 8), (512, 128, 4, 4),
                                 (2048, 256, 8, 8), (512, 128, 1, 1), (1024, 256, 2, 2),
                                 (2048, 512, 4, 4), (4096, 1024, 4, 4), (4096, 1024, 8, 8),
                                 (8192, 1024, 8, 8)]]


def block(kind: str, mode: str, impl: str, n: int, d: int) -> torch.nn.Module:
    cls = blocks.get(kind)
    ins = [streams(n, d)] + ([hidden(d)] if kind == "hc_write" else [])
    blk = cls(cls.Config(mode=mode, impl=impl), ins, Context("x", layer=1, n_layer=2)).cuda()
    blk.init_weights(None)
    return blk


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def floor_bytes(kind: str, tokens: int, n: int, d: int) -> int:
    """fp32 streams h, bf16 y: forward reads h (and y) and writes the output; backward reads the
    output's gradient, h (and y) and writes dh (and dy)."""
    h, y = tokens * n * d * 4, tokens * d * 2
    out = tokens * d * 4 if kind == "hc_read" else tokens * n * d * 4
    with_y = 2 * y if kind == "hc_write" else 0
    return (h + out + with_y // 2) + (out + 2 * h + with_y)


def first(out):
    """hc_read gives (h_in, the streams for its write): h_in."""
    return out[0] if isinstance(out, tuple) else out


def step(m, args, grad):
    first(m(*args)).backward(grad)


def error(fused, twin, args, grad) -> float:
    """max |fused - twin| / max |twin| over the output and the inputs' gradients."""
    got, want = [], []
    for m, into in ((fused, got), (twin, want)):
        for a in args:
            a.grad = None
        out = first(m(*args))
        out.backward(grad)
        into += [out.detach(), *(a.grad for a in args)]
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
               for g, w in zip(got, want))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hc_kernels")
    ap.add_argument("--tokens", type=int, default=16 * 1024)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    a = ap.parse_args(argv)
    n, d, t = a.streams, a.dim, a.tokens
    print(f"## one connection, {t} tokens, n = {n}, d = {d}, fp32 streams, bf16 y "
          f"(`{torch.cuda.get_device_name()}`)")
    print("| connection | impl | settings | ms (fwd + bwd) | ms (fwd) | share of the HBM floor "
          "| error |\n|---|---|---|---|---|---|---|")
    for kind, mode in itertools.product(("hc_read", "hc_write"), ("dynamic", "static")):
        h = torch.randn(t, 1, n, d, device="cuda", requires_grad=True)
        args = (h, torch.randn(t, 1, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True)) if kind == "hc_write" else (h,)
        floor = floor_bytes(kind, t, n, d) / HBM * 1e3
        twin = torch.compile(block(kind, mode, "torch", n, d))
        grad = torch.randn_like(first(twin(*args)))
        ms, fwd = time_ms(lambda: step(twin, args, grad)), time_ms(lambda: first(twin(*args)))
        print(f"| {kind} {mode} | torch (compiled) | - | {ms:.3f} | {fwd:.3f} | {floor / ms:.0%} "
              "| - |")
        fused, eager = block(kind, mode, "triton", n, d), block(kind, mode, "torch", n, d)
        for s in SETTINGS:
            hk.TUNE.update(s)
            try:
                ms = time_ms(lambda: step(fused, args, grad))
                fwd = time_ms(lambda: first(fused(*args)))
                err = error(fused, eager, args, grad)
            except Exception as e:   # a setting the compiler refuses (registers, shared memory)
                print(f"| {kind} {mode} | triton | {s} | failed: {type(e).__name__} | | | |")
                continue
            print(f"| {kind} {mode} | triton | {s} | {ms:.3f} | {fwd:.3f} | {floor / ms:.0%} "
                  f"| {err:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
