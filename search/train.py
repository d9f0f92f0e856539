"""`python -m search.train FILE [--size S] [--set k=v] [--budget 10m] [--tokens N] [--data SPEC]`

Trains one concrete graph on the built-in corpus (or SPEC), tracked in MLflow, with a progress
bar, evaluation in bits per byte, atomic checkpoints and `--resume DIR`. Works under
`torchrun --nproc_per_node N` (DDP). Exit 0 completed, 2 bad input, 3 diverged, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from graphs.compile import MODES
from graphs.errors import GraphError
from search.budget import format_duration, parse_count, parse_duration
from search.dist import teardown
from search.phases import Phases
from search.setup import RunConfig, Setup
from search.trainer import RunResult, Trainer

EXIT = {"completed": 0, "pruned": 0, "diverged": 3, "interrupted": 130, "failed": 1}


def run_training(cfg: RunConfig, on_eval=None, phases: Phases | None = None,
                 should_stop=None) -> RunResult:
    """Train per `cfg`; a failure after tracking started is recorded (status failed, traceback).
    `phases`: the clock to split the wall time on (a search trial's own; default a new one).
    `on_eval(tokens, metrics)` and `should_stop()` (asked at log points): True stops the run as
    pruned (a search trial's pruner, the study's budget)."""
    if cfg.budget_s is None and cfg.max_tokens is None and cfg.max_bytes is None:
        raise ValueError("give a time budget, a token count or a byte count")
    phases = phases or Phases()
    with phases("setup"):
        setup = Setup(cfg, phases)
    try:
        return Trainer(setup, on_eval, should_stop).run()
    except Exception as e:
        result = RunResult("failed", message=f"{type(e).__name__}: {e}", run_id=setup.tracker.run_id,
                           run_dir=str(setup.run_dir))
        with phases("track"):
            setup.tracker.log_text(traceback.format_exc(), "error.txt")
        setup.close(result)
        raise


def parse_args(argv=None) -> RunConfig:
    ap = argparse.ArgumentParser(prog="python -m search.train", description=__doc__.split("\n\n")[1])
    ap.add_argument("graph", metavar="FILE")
    ap.add_argument("--size")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", dest="sets")
    ap.add_argument("--budget", help="device time of training steps, e.g. 60s, 10m, 2h (default 10m "
                                     "unless --tokens is given)")
    ap.add_argument("--tokens", help="train on this many tokens (e.g. 50M); with --budget, whichever ends first")
    ap.add_argument("--bytes", help="train on this many bytes of text (e.g. 200M): BPE and byte "
                                    "models see the same text; with --budget or --tokens, whichever ends first")
    ap.add_argument("--data", help="token shards folder, raw_u16:DIR, or builtin (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evals", type=int, default=10, help="evaluations over the run")
    ap.add_argument("--eval-bytes", type=parse_count, help="validation span in bytes")
    ap.add_argument("--log-every", type=int, default=10, help="steps between logged train metrics")
    ap.add_argument("--checkpoint-every", default="10m",
                    help="checkpoint at evaluations at most this often (0: at every one)")
    ap.add_argument("--pure-steps", type=int, default=0,
                    help="after the run, time this many steps on one batch (pure step speed)")
    ap.add_argument("--out", help="run folder (default runs/<graph>-<hash>-<time>)")
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    ap.add_argument("--compile", default="auto", choices=MODES,
                    help="auto: none on CPU, else regional (full without repeat groups); nested is experimental")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow (local files only)")
    ap.add_argument("--experiment", default="playground")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    budget = parse_duration(a.budget) if a.budget else None
    tokens = parse_count(a.tokens) if a.tokens else None
    nbytes = parse_count(a.bytes) if a.bytes else None
    if budget is None and tokens is None and nbytes is None:
        budget = 600.0
    return RunConfig(graph=a.graph, size=a.size, sets=tuple(a.sets), budget_s=budget, max_tokens=tokens,
                     max_bytes=nbytes,
                     data=a.data, seed=a.seed, evals=a.evals, eval_bytes=a.eval_bytes,
                     log_every=a.log_every, out=a.out,
                     checkpoint_every_s=parse_duration(a.checkpoint_every), pure_steps=a.pure_steps, resume=a.resume, compile=a.compile,
                     device=a.device, track=not a.no_track, experiment=a.experiment,
                     progress=not a.no_progress)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        r = run_training(cfg)
    except GraphError as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()  # leave the process group cleanly under torchrun (no NCCL leak warning)
    bpb = f"{r.val_bpb:.4f}" if r.val_bpb is not None else "-"
    loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
    cache = f" (cache {r.compile_cache})" if r.compile_cache != "off" else ""
    print(f"{r.status}: {r.step} steps, {r.tokens:,} tokens in {format_duration(r.train_s)} of training "
          f"(+{r.compile_s:.1f}s compile{cache}, {r.eval_s:.1f}s eval); val loss {loss}, val bpb {bpb}; "
          f"run {r.run_id or '-'} in {r.run_dir}" + (f"\n{r.message}" if r.message else ""))
    if r.pure_tok_s:
        print(f"end-to-end {r.e2e_tok_s:,.0f} tok/s = {r.e2e_tok_s / r.pure_tok_s:.3f} x the pure step "
              f"speed {r.pure_tok_s:,.0f} tok/s (same process, fixed batch)")
    return EXIT.get(r.status, 1)


if __name__ == "__main__":
    sys.exit(main())
