"""`python -m bench.profile_step MODEL [MODEL...] [--batch 16] [--top 25]`: where a compiled
training step's GPU time goes, kernel by kernel (torch.profiler over 3 steps after warm-up).
MODEL as in `python -m search.bench --models` (e.g. ngpt, gpt2@ce). GPU only."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from graphs.compile import compile_model
from search.bench import Runner
from search.bench_models import graph_model


def profile_model(spec: str, batch: int, top: int) -> None:
    device = torch.device("cuda")
    torch._dynamo.reset()
    plan, m = graph_model(spec, None, device)
    r = Runner(spec, m, compile_model(m, "regional", dynamic=False), batch, plan.seq_len,
               plan.vars["vocab_size"], device)
    for _ in range(5):
        r.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            r.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    print(f"## {spec}, batch {batch}: {total / 3e3:.1f} ms of GPU kernels a step")
    print("| kernel | ms/step | share | calls/step |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"| {e.key[:90]} | {e.self_device_time_total / 3e3:.2f} | "
              f"{100 * e.self_device_time_total / total:.1f}% | {e.count // 3} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    for spec in a.models:
        profile_model(spec, a.batch, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
