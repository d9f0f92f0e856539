"""`python -m search.bench [--size S] [--batch 16,32] [--steps 20] [--write docs/benchmarks.md]`

Times a full training step (forward, backward, fused AdamW, bf16 autocast) of the hand-written
references in bench/ against the same models built from graphs/*.yaml, interleaved in one
process, after checking that both give the same loss on the same batch and weights. Reports
tokens/s, MFU (against this run's measured bf16 matmul peak and the datasheet peak), peak
memory, cold and warm compile time and recompilations. On CPU it runs at `tiny` size so CI keeps
it working; speed numbers there mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from search.bench_models import PAIRS, ROOT, base_name, graph_model, reference_model


def matmul_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in "ab")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


class Runner:
    """A model with its compiled step and optimizer on one random batch stream."""

    def __init__(self, label, model, compiled, batch, seq_len, vocab, device):
        self.label, self.model, self.compiled = label, model, compiled
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        g = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [torch.randint(0, min(vocab, 50257), (batch, seq_len + 1), generator=g).to(device)
                        for _ in range(4)]
        self.i, self.device = 0, device
        self.autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)

    def step(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.autocast:
            _, loss = self.compiled(b[:, :-1], b[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_step"):   # e.g. nGPT's retraction: part of its step's cost
            self.model.after_step()
        return loss

    def timed(self, n: int) -> list[float]:
        if self.device.type != "cuda":
            out = []
            for _ in range(n):
                t = time.perf_counter()
                self.step()
                out.append(time.perf_counter() - t)
            return out
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        ev[0].record()
        for i in range(n):
            self.step()
            ev[i + 1].record()
        torch.cuda.synchronize()
        return [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(n)]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def build_pair(name, size, batch, device, modes, twins=True):
    """The hand-written reference and the graph model (one per compile mode), same weights."""
    from bench.reference import load_from_graph
    from graphs.compile import compile_model
    from graphs.cost import analyse
    plan, gm = graph_model(name, size, device)
    fpt = analyse(plan).flops_per_token
    T, V = plan.seq_len, plan.vars["vocab_size"]
    runners, la = [], None
    if twins and name in PAIRS:   # graphs without a hand-written twin (nGPT, ...) are timed against gpt2's graph
        ref = reference_model(name, plan, device)
        load_from_graph(ref, gm)
        with torch.no_grad():  # same weights, same batch -> same loss (fp32, eager)
            idx = torch.randint(0, 50257, (2, plan.seq_len), device=device)
            la, lb = gm(idx, idx)[1].item(), ref(idx, idx)[1].item()
        if abs(la - lb) > 1e-4 * abs(la):
            raise AssertionError(f"{name}: graph loss {la} != reference loss {lb}")
        compiled_ref = ref if "none" in modes else torch.compile(ref, dynamic=False)
        runners.append(Runner(f"{name} hand-written", ref, compiled_ref, batch, T, V, device))
    for mode in modes:
        m = gm if mode == modes[0] else graph_model(name, size, device)[1]
        if m is not gm:
            m.load_state_dict(gm.state_dict())
        c = m if mode == "none" else compile_model(m, mode, dynamic=False)
        runners.append(Runner(f"{name} graph ({mode})", m, c, batch, T, V, device))
    return fpt, runners, la


def _first_step(r: Runner, device) -> float:
    """Time of the first step: compilation, in a fresh inductor cache of its own (cold)."""
    r.cache_dir = tempfile.mkdtemp(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = r.cache_dir
    t = time.perf_counter()
    r.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(names, size, batches, steps, device, modes, peak_meas, peak_sheet, twins=True,
            together=False) -> list[dict]:
    from graphs.build import GraphModel
    from graphs.compile import allow_entries, regional_entries
    rows, groups = [], {}
    for name in names:  # variants of one graph are interleaved with it (and its twin); all at once with `together`
        groups.setdefault("all" if together else base_name(name), []).append(name)
    for group in groups.values():
        for batch in batches:
            torch._dynamo.reset()
            runners, loss = [], None
            for name in group:
                fpt, more, la = build_pair(name, size, batch, device, modes, twins)
                for r in more:
                    r.fpt = fpt
                runners += more
                loss = loss if la is None else la
            # the models of one process share Dynamo's per-code entries (graphs/compile.py): room
            # for all of them, and a hard error rather than a model timed with eager regions
            allow_entries(sum(regional_entries(r.model) for r in runners if isinstance(r.model, GraphModel)))
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            for r in runners:
                r.compile_s = _first_step(r, device)
                r.timed(3)
            times = {r.label: [] for r in runners}
            recompiles = {r.label: 0 for r in runners}   # new Dynamo graphs during each one's steps
            for _ in range(max(1, steps // 5)):  # interleaved rounds of 5 steps each
                for r in runners:
                    before = unique_graphs()
                    times[r.label] += r.timed(5)
                    recompiles[r.label] += unique_graphs() - before
            peaks = peak_memory(runners, device)
            for r in runners:
                med = statistics.median(times[r.label])
                tok_s = batch * (r.batches[0].shape[1] - 1) / med
                rows.append({"model": r.label, "batch": batch, "tok_s": tok_s, "ms_step": med * 1e3,
                             "mfu_meas": r.fpt * tok_s / peak_meas if peak_meas else None,
                             "mfu_sheet": r.fpt * tok_s / peak_sheet if peak_sheet else None,
                             "compile_s": r.compile_s, "recompiles": recompiles[r.label], "loss_check": loss,
                             "steps": len(times[r.label]), "peak_gib": peaks.get(r.label),
                             "cache_dir": getattr(r, "cache_dir", None)})
            for row in rows[-len(runners):]:   # as it goes: a run cut off at its time limit keeps these
                print("row " + json.dumps({k: v for k, v in row.items() if k != "cache_dir"}, default=str), flush=True)
            del runners
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _move_state(r: "Runner", device) -> None:
    r.model.to(device)
    for st in r.opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                st[k] = v.to(device)


def peak_memory(runners, device) -> dict:
    """Peak memory of each model's steps alone: the other model is moved off the device."""
    if device.type != "cuda":
        return {}
    out = {}
    for r in runners:
        others = [o for o in runners if o is not r]
        for o in others:
            _move_state(o, "cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        r.timed(3)
        out[r.label] = torch.cuda.max_memory_allocated(device) / 2**30
        for o in others:
            _move_state(o, device)
    return out


def warm_compile(name: str, size: str | None, batch: int, device, compile_mode: str) -> float:
    """First-step time of the graph model in a new process sharing this process's cache."""
    cmd = [sys.executable, "-m", "search.bench", "--warm", name, "--batch", str(batch),
           "--compile", compile_mode] + (["--size", size] if size else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"warm-compile process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["first_step_s"]


def _warm_main(name, size, batch, device, compile_mode) -> None:
    from graphs.compile import compile_model
    plan, gm = graph_model(name, size, device)
    r = Runner("warm", gm, compile_model(gm, compile_mode, dynamic=False), batch, plan.seq_len,
               plan.vars["vocab_size"], device)
    t = time.perf_counter()
    r.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"first_step_s": time.perf_counter() - t}))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, warm, meta, baseline: str = "gpt2") -> str:
    lines = [f"### {meta['title']}", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}",
             f"- bf16 8192³ matmul measured in this run: {fmt(meta['peak_meas'] and meta['peak_meas'] / 1e12, '.0f')} "
             "TFLOP/s; datasheet peak {0}".format(fmt(meta['peak_sheet'] and meta['peak_sheet'] / 1e12, '.1f')),
             "- FLOPs/token: 3 x forward FLOPs by torch.utils.flop_counter = PaLM 6N + 12·L·d·T "
             "(attention in full); medians of interleaved steps (5 per round) after 3 warm-up steps", "",
             f"| model | batch | tok/s | ms/step | tok/s vs hand-written | step time vs {baseline} graph | "
             "MFU (measured peak) | MFU (datasheet) | peak GiB | cold compile s | warm compile s | recompiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(base_name(r["model"].split()[0]), r["batch"]): r["tok_s"] for r in rows if "hand-written" in r["model"]}
    ref = {(r["model"].split(" ", 1)[1], r["batch"]): r["ms_step"] for r in rows
           if r["model"].startswith(f"{baseline} graph")}
    for r in rows:
        key = (base_name(r["model"].split()[0]), r["batch"])
        ratio = r["tok_s"] / base[key] if key in base and "hand-written" not in r["model"] else None
        g = ref.get((r["model"].split(" ", 1)[1], r["batch"]))
        vs_ref = r["ms_step"] / g if g and "graph" in r["model"] and not r["model"].startswith(f"{baseline} ") else None
        w = warm.get((r["model"], r["batch"]))
        lines.append(f"| {r['model']} | {r['batch']} | {r['tok_s']:,.0f} | {r['ms_step']:.1f} | "
                     f"{fmt(ratio, '.3f')}× | {fmt(vs_ref, '.3f')}× | "
                     f"{fmt(r['mfu_meas'] and 100 * r['mfu_meas'], '.1f')}% | "
                     f"{fmt(r['mfu_sheet'] and 100 * r['mfu_sheet'], '.1f')}% | {fmt(r.get('peak_gib'), '.2f')} | "
                     f"{r['compile_s']:.1f} | {fmt(w, '.1f')} | {r['recompiles']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m search.bench")
    ap.add_argument("--models", default=",".join(sorted(p.stem for p in (ROOT / "graphs").glob("*.yaml"))),
                    help="graphs/NAME.yaml to time (default: all; gpt2 and llama also run their "
                         "hand-written twins); NAME+SET+...@VARIANT for a variant, e.g. "
                         "hyper+hc=mhc, llama@liger, llama@auto, llama@flce, llama@ce, ngpt@chunked")
    ap.add_argument("--size", help="graph size (default: tiny on CPU, the real size on GPU)")
    ap.add_argument("--batch", default=None, help="comma list (default 16,32 on GPU, 2 on CPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", default="auto", help="graph compile modes, comma list of "
                    "auto, regional, full, nested, none (e.g. regional,full)")
    ap.add_argument("--write", help="append the table to this markdown file")
    ap.add_argument("--baseline", default="gpt2", help="graph whose step time the others are divided "
                                                       "by (default gpt2; e.g. llama for hyper)")
    ap.add_argument("--no-twins", action="store_true", help="skip the hand-written references")
    ap.add_argument("--together", action="store_true", help="interleave every model with every other "
                    "(default: each graph with its own variants and twin)")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-start compile (new process)")
    ap.add_argument("--warm-only", help="comma list of models whose warm start is timed (default: every graph)")
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = a.size or (None if device.type == "cuda" else "tiny")
    batches = [int(b) for b in (a.batch or ("16,32" if device.type == "cuda" else "2")).split(",")]
    if a.warm:
        _warm_main(a.warm, size, batches[0], device, a.compile)
        return 0
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))
    compile_mode = a.compile if device.type == "cuda" or a.compile != "auto" else "none"
    peak_meas = matmul_peak(device)
    from search.perf import peak_flops
    peak_sheet = peak_flops(device)
    names = a.models.split(",")
    modes = ["none"] if compile_mode == "none" else compile_mode.split(",")
    rows = measure(names, size, batches, a.steps, device, modes, peak_meas, peak_sheet, not a.no_twins,
                   a.together)
    warm = {}
    for row in rows:  # a new process on the same cache: the warm start a search trial sees
        chosen = a.warm_only is None or row["model"].split()[0] in a.warm_only.split(",")
        if "graph" in row["model"] and modes != ["none"] and row["batch"] == batches[0] and not a.no_warm and chosen:
            mode = row["model"].split("(")[1].rstrip(")")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = row["cache_dir"]
            warm[(row["model"], row["batch"])] = warm_compile(row["model"].split()[0], size, row["batch"],
                                                              device, mode)
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    meta = run_meta("search.bench", "Graph vs hand-written training step", argv, device,
                    triton=triton_v, peak_meas=peak_meas, peak_sheet=peak_sheet)
    text = table(rows, warm, meta, a.baseline)
    publish(text, a.write)
    print(json.dumps({"rows": rows, "warm": {f"{k[0]}@{k[1]}": v for k, v in warm.items()}, "meta": meta},
                     default=str))
    return 0


def run_meta(prog: str, title: str, argv, device, **extra) -> dict:
    """Title, command, device, versions and date of a benchmark run, for its table's header."""
    from search.perf import device_name
    return {"title": f"{title} ({device_name(device)}, {time.strftime('%Y-%m-%d')})",
            "command": f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": device_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra}


def publish(text: str, write: str | None) -> None:
    """Print a benchmark's markdown table and append it to `write` when given."""
    print(text)
    if write:
        with open(write, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
