"""`python -m search.compare FILE... [--size S] [--set K=V] [--seeds 3] [--budget 60s | --tokens N]`

An equal-device-time comparison of graphs over seeds. Every graph trains as its baseline (search
markers at their defaults) with seeds 0..K-1 (the seed sets initialisation and data order) for the
same time of training steps (or the same tokens), on the same data and validation bytes. Runs go
seed-major (seed 0 of every graph, then seed 1, ...) so a slow drift of the machine hits every
graph alike. MLflow gets one parent run with a child per run; a run that fails or diverges is
listed with its reason and the comparison goes on. The markdown report (`--out`) is rewritten
after every run, so a comparison cut short keeps what it measured.

Verdict on a graph's mean val_bpb against the first graph's: "beyond noise" only when the
difference exceeds twice its standard error sqrt(s1^2/n1 + s2^2/n2) (sample standard deviations;
an approximate 95% test that needs 3 or more seeds to mean much).
"""
from __future__ import annotations

import argparse
import gc
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

import graphs
from graphs.compile import MODES
from graphs.cost import analyse
from graphs.errors import GraphError
from search.budget import format_duration, parse_count, parse_duration
from search.data import open_dataset
from search.perf import device_name
from search.setup import CPU_EVAL_BYTES, RunConfig, git_commit
from search.track import Tracker
from search.train import run_training


@dataclass
class Entry:
    """One graph of the comparison, loaded and costed before any device time is spent."""
    name: str
    file: str
    sets: tuple
    params: int
    params_non_embedding: int
    corpus: str


@dataclass
class Outcome:
    """One run: a graph at a seed."""
    graph: str
    seed: int
    status: str
    val_bpb: float | None = None
    val_loss: float | None = None
    tokens: int = 0
    tok_s: float | None = None
    step_ms: float | None = None
    message: str = ""


def graph_sets(files: list[str], sets) -> dict[str, tuple]:
    """Each file's --set items: `NAME:K=V` goes to graph NAME (its name or file stem) only; a bare
    `K=V` goes, as in search.run, to the graphs that have that variable."""
    from search.study import family_sets  # imports optuna: only where used
    names = {f: {Path(f).stem, graphs.load(f).name} for f in files}
    out = family_sets(files, [s for s in sets if ":" not in s.partition("=")[0]])
    for item in sets:
        key, eq, value = item.partition("=")
        target, colon, var = key.partition(":")
        if not colon:
            continue
        if not any(target.strip() in n for n in names.values()):
            raise ValueError(f"--set {item}: no graph named {target.strip()!r}")
        for f in files:
            if target.strip() in names[f]:
                out[f] += (var + eq + value,)
    return out


def prepare(a) -> list[Entry]:
    """Load each graph, resolve it to its baseline, count its parameters, open its data."""
    entries = []
    for f, sets in graph_sets(a.files, a.sets).items():
        plan = graphs.elaborate(graphs.load(f, a.size, sets).resolve())
        if any(e.name == plan.name for e in entries):
            raise ValueError(f"two graph files are named {plan.name!r}")
        cost = analyse(plan)
        ds = open_dataset(a.data, "gpt2" if plan.input == "tokens" else "bytes")
        entries.append(Entry(plan.name, f, sets, cost.params, cost.params_non_embedding,
                             f"{ds.name} ({ds.tokenizer}, sha256 {ds.content_hash[:16]})"))
    return entries


def run_one(a, e: Entry, seed: int, parent_id: str | None) -> Outcome:
    """Train one graph at one seed; a failure becomes an Outcome, never an exception."""
    torch._dynamo.reset()  # a fresh compilation per run, as in a study
    cfg = RunConfig(graph=e.file, size=a.size, sets=e.sets, budget_s=a.budget_s, max_tokens=a.max_tokens,
                    data=a.data, seed=seed, evals=a.evals, eval_bytes=a.eval_bytes, compile=a.compile,
                    device=a.device, track=a.track, experiment=a.experiment, parent_run_id=parent_id,
                    run_name=f"{a.name}-{e.name}-seed{seed}", out=f"runs/{a.name}/{e.name}-seed{seed}",
                    progress=False, tags={"compare": a.name, "seed": str(seed)})
    try:
        r = run_training(cfg)
    except Exception as exc:  # noqa: BLE001 - recorded in the table; the comparison goes on
        return Outcome(e.name, seed, "failed", message=f"{type(exc).__name__}: {exc}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    timed = r.step - 1  # the first (compiling) step is not in train_s
    ok = timed > 0 and r.train_s > 0
    return Outcome(e.name, seed, r.status, r.val_bpb, r.val_loss, r.tokens,
                   r.tokens * timed / r.step / r.train_s if ok else None,
                   1000 * r.train_s / timed if ok else None, r.message)


def run_all(a, entries: list[Entry], parent_id: str | None, on_run) -> list[Outcome]:
    """Seed-major: every graph at seed 0, then at seed 1, ...; progress and ETA on stderr."""
    plan = [(seed, e) for seed in range(a.seeds) for e in entries]
    outcomes, t0 = [], time.time()
    for i, (seed, e) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {e.name} seed {seed} ...", file=sys.stderr, flush=True)
        try:
            o = run_one(a, e, seed, parent_id)
        except KeyboardInterrupt:  # during set-up; the trainer itself returns "interrupted"
            o = Outcome(e.name, seed, "interrupted", message="stopped by Ctrl-C")
        outcomes.append(o)
        on_run(outcomes)
        got = f"val_bpb {o.val_bpb:.4f}" if o.val_bpb is not None else o.message[:200]
        eta = format_duration((time.time() - t0) / i * (len(plan) - i))
        print(f"[{i}/{len(plan)}] {e.name} seed {seed}: {o.status}, {got}; ETA {eta}", file=sys.stderr)
        if o.status == "interrupted":
            break
    return outcomes


def stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan below 2 values), n."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def difference(base: list[float], other: list[float]) -> tuple[float, float]:
    """Difference of the means (other - base) and its standard error."""
    (mb, sb, nb), (mo, so, no) = stats(base), stats(other)
    return mo - mb, math.sqrt(sb ** 2 / nb + so ** 2 / no)


def verdict(base: list[float], other: list[float]) -> str:
    """Lower is better: beyond noise only when |mean difference| > 2 x its standard error."""
    if min(len(base), len(other)) < 2:
        return "not enough seeds (need 2 or more completed runs each)"
    diff, se = difference(base, other)
    if abs(diff) <= 2 * se:
        return "within noise"
    return "better beyond noise" if diff < 0 else "worse beyond noise"


def _fmt(vals: list, spec: str, how: str = "median") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if how == "median":
        return format(statistics.median(vals), spec)
    m, sd, n = stats(vals)
    return f"{m:{spec}} ± {sd:{spec}} ({n})" if n > 1 else f"{m:{spec}} (1)"


GRAPH_COLUMNS = ("graph", "params (non-emb / total)", "tok/s (median)", "step ms (median)",
                 "tokens trained (median)", "val_bpb mean ± std (n)", "val_bpb min–max",
                 "val_loss mean ± std (n)", "Δ val_bpb vs {ref}", "verdict")
RUN_COLUMNS = ("seed", "graph", "status", "val_bpb", "val_loss", "tokens", "tok/s", "reason")


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _versus(base: list[float] | None, bpb: list[float]) -> tuple[str, str]:
    """The Δ and verdict cells; base None for the reference graph itself."""
    if base is None or not base or not bpb:
        return "-", "reference" if base is None else "no completed runs"
    diff, se = difference(base, bpb)
    return f"{diff:+.4f}" + ("" if math.isnan(se) else f" (2·SE {2 * se:.4f})"), verdict(base, bpb)


def _graph_row(e: Entry, done: list[Outcome], base: list[float] | None) -> str:
    bpb = [o.val_bpb for o in done]
    return _md_row([e.name, f"{e.params_non_embedding / 1e6:.2f}M / {e.params / 1e6:.2f}M",
                    _fmt([o.tok_s for o in done], ",.0f"), _fmt([o.step_ms for o in done], ".1f"),
                    _fmt([o.tokens for o in done], ",.0f"), _fmt(bpb, ".4f", "mean"),
                    f"{min(bpb):.4f}–{max(bpb):.4f}" if bpb else "-",
                    _fmt([o.val_loss for o in done], ".4f", "mean"), *_versus(base, bpb)])


def completed(outcomes: list[Outcome], graph: str) -> list[Outcome]:
    return [o for o in outcomes if o.graph == graph and o.status == "completed" and o.val_bpb is not None]


def table(entries: list[Entry], outcomes: list[Outcome]) -> str:
    """Per graph (completed runs only), then every run with its status and reason."""
    ref = entries[0].name
    base = [o.val_bpb for o in completed(outcomes, ref)]
    lines = [_md_row(c.format(ref=ref) for c in GRAPH_COLUMNS), "|---" * len(GRAPH_COLUMNS) + "|"]
    lines += [_graph_row(e, completed(outcomes, e.name), None if e.name == ref else base) for e in entries]
    lines += ["", _md_row(RUN_COLUMNS), "|---" * len(RUN_COLUMNS) + "|"]
    lines += [_md_row([o.seed, o.graph, o.status, _fmt([o.val_bpb], ".4f"), _fmt([o.val_loss], ".4f"),
                       f"{o.tokens:,}", _fmt([o.tok_s], ",.0f"), o.message.replace("|", "/")[:200]])
              for o in outcomes]
    return "\n".join(lines)


NOTES = ("- tok/s and step time exclude the first step; non-embedding params leave out lookup tables "
         "not tied to a head (nanoGPT's count); search markers stand at their defaults\n"
         "- verdict: beyond noise only when |Δ| > 2 × the standard error of the difference of the "
         "means (sample std; an approximate 95% test that needs 3 or more seeds to mean much)")


def header(a, entries: list[Entry], n_runs: int) -> str:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" \
        else torch.device(a.device)
    limits = [f"{format_duration(a.budget_s)} of training steps"] if a.budget_s else []
    limits += [f"{a.max_tokens:,} tokens"] if a.max_tokens else []
    spend = " or ".join(limits) + (", whichever ends first" if len(limits) > 1 else "")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Comparison: {' vs '.join(e.name for e in entries)}\n\n- command: `{a.command}`\n"
            f"- device: {device_name(dev)}; torch {torch.__version__}; git {git_commit()}; {when}\n"
            f"- data: {'; '.join(sorted({e.corpus for e in entries}))}; validation: the same "
            f"{a.eval_bytes:,} bytes for every run\n"
            f"- budget per run: {spend} (the first, compiling step and evaluations not counted); "
            f"size {a.size or 'default'}; --set {' '.join(a.sets) or '(none)'}\n"
            f"- seeds 0..{a.seeds - 1} (initialisation and data order), interleaved seed-major; "
            f"{n_runs} of {a.seeds * len(entries)} runs done\n{NOTES}\n")


def report(a, entries: list[Entry], outcomes: list[Outcome]) -> str:
    """The markdown report; written to --out (after every run, so nothing measured is lost)."""
    text = header(a, entries, len(outcomes)) + "\n" + table(entries, outcomes)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return text


def parent_run(a, entries: list[Entry]) -> Tracker:
    """The comparison's MLflow run; every training run is its child."""
    t = Tracker(a.experiment, a.name, local_dir=Path("runs") / a.name, enabled=a.track, system_metrics=False,
                tags={"kind": "comparison", "compare": a.name, "graphs": ",".join(e.name for e in entries)})
    t.start()
    t.log_params({"files": ",".join(a.files), "size": a.size, "sets": " ".join(a.sets), "seeds": a.seeds,
                  "budget_s": a.budget_s, "max_tokens": a.max_tokens, "data": a.data or "builtin",
                  "eval_bytes": a.eval_bytes, "command": a.command})
    return t


def finish(a, parent: Tracker, entries: list[Entry], outcomes: list[Outcome], text: str) -> None:
    for e in entries:
        bpb = [o.val_bpb for o in completed(outcomes, e.name)]
        if bpb:
            m, sd, n = stats(bpb)
            parent.log_metrics({f"compare/{e.name}/val_bpb_mean": m, f"compare/{e.name}/n": n,
                                **({f"compare/{e.name}/val_bpb_std": sd} if n > 1 else {})}, 0)
    parent.log_text(text, "comparison.md")
    parent.end("completed" if len(outcomes) == a.seeds * len(entries) else "interrupted")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m search.compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--size")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", dest="sets",
                    help="for every graph with that variable; NAME:K=V for graph NAME only")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", help="training-step time per run, e.g. 60s (default 60s unless --tokens)")
    ap.add_argument("--tokens", help="train every run on this many tokens instead (e.g. 20M)")
    ap.add_argument("--data", help="token shards folder, raw_u16:DIR, or builtin (default)")
    ap.add_argument("--evals", type=int, default=4, help="evaluations per run (the last one counts)")
    ap.add_argument("--eval-bytes", type=parse_count, help="validation span (default 1M on GPU, 16k on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", default="auto", choices=MODES)
    ap.add_argument("--out", help="also write the markdown report here, e.g. docs/comparisons/NAME.md")
    ap.add_argument("--experiment", default="playground")
    ap.add_argument("--no-track", dest="track", action="store_false", help="no MLflow (local files only)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error("--seeds must be at least 1")
    a.budget_s = parse_duration(a.budget) if a.budget else (None if a.tokens else 60.0)
    a.max_tokens = parse_count(a.tokens) if a.tokens else None
    cuda = a.device.startswith("cuda") or a.device == "auto" and torch.cuda.is_available()
    a.eval_bytes = a.eval_bytes or (1 << 20 if cuda else CPU_EVAL_BYTES)  # search.setup's default, made explicit
    a.command = "python -m search.compare " + shlex.join(argv)
    stem = Path(a.out).stem if a.out else "+".join(Path(f).stem for f in a.files) + f"-{a.size or 'default'}"
    a.name = f"compare-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        entries = prepare(a)
    except (GraphError, ValueError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    parent = parent_run(a, entries)
    print(f"{a.name}: {len(entries)} graphs x {a.seeds} seeds = {len(entries) * a.seeds} runs",
          file=sys.stderr)
    outcomes = run_all(a, entries, parent.run_id, lambda done: report(a, entries, done))
    text = report(a, entries, outcomes)
    print(text)
    finish(a, parent, entries, outcomes, text)
    if any(o.status == "interrupted" for o in outcomes):
        return 130
    return 0 if all(o.status == "completed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
