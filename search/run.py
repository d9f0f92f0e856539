"""`python -m search.run [FILE...] [--budget 2h] [--trial-budget 5m] [--trials N] [--storage URL]`

The architecture search. Optuna samples graph variants from the YAML markers (several files: the
family is a choice too), trains each for an equal slice of device time, prunes poor trials by
successive halving, and tracks one MLflow parent run per study with a child run per trial. The
unmodified graphs are enqueued first, so every study contains its baseline. Re-running the same
command resumes the study. With no FILE: the default study of graphs/ngpt.yaml at `tiny` size
(its markers: width, depth, alpha and s_qk init, learning rate, and the paper's ambiguities),
sized to finish in about 5 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from optuna.trial import TrialState

from graphs.errors import GraphError
from search.budget import format_duration, parse_count, parse_duration
from search.study import Objective, StudyConfig, baseline_params, check_data, load_families
from search.study_store import settle_dead_trials, storage

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GRAPHS = ["graphs/ngpt.yaml", "graphs/gpt2.yaml"]
_PARENT: list = []
_CREATED: set = set()  # studies this process created
PARENT_WAIT_S = 60.0   # a command that did not create the study waits this long for its parent run


def default_files() -> list[str]:
    for f in DEFAULT_GRAPHS:
        if (ROOT / f).exists():
            if f != DEFAULT_GRAPHS[0]:
                print(f"note: {DEFAULT_GRAPHS[0]} does not exist yet; the default study uses {f}",
                      file=sys.stderr)
            return [str(ROOT / f)]
    raise FileNotFoundError("no default graph found")


def pruner(name: str, evals: int):
    """Steps are evaluation indices 1..evals (search/study.py). Successive halving keeps the best
    third at evaluations 1, 3, 9, ... (Optuna's min_resource "auto" would set its first rung at
    1/100 of the last step and stack every rung onto the first evaluation)."""
    import optuna.pruners as p
    return {"sh": lambda: p.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "hyperband": lambda: p.HyperbandPruner(min_resource=1, max_resource=max(evals, 1),
                                                   reduction_factor=3),
            "median": lambda: p.MedianPruner(n_startup_trials=2), "wilcoxon": lambda: p.WilcoxonPruner(),
            "none": lambda: p.NopPruner()}[name]()


def open_study(cfg: StudyConfig, fams: dict, seed: int | None = 0):
    """The study, created or resumed. `seed` seeds the sampler only of the command that creates
    the study; spawned workers pass `seed=None`, and a resumed study is never seeded: samplers
    seeded alike (workers of one command, the same command in two shells, or the same command run
    again to resume) draw the same random start-up trials, so all but the first would wait out or
    repeat a twin (on the GPU, a resumed study trained a pruned trial's graph again). Constant
    liar keeps TPE from proposing what another worker is training. Only the command that creates
    the study enqueues the baselines."""
    import warnings

    import optuna
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize"] + [{"params": "minimize", "tok_s": "maximize"}[a] for a in cfg.also]
    def sampler(seed):
        return optuna.samplers.TPESampler(seed=seed, group=True, multivariate=True,
                                          constant_liar=cfg.workers > 1)
    kw = {"study_name": cfg.study, "storage": storage(cfg), "pruner": pruner(cfg.pruner, cfg.evals)}
    try:  # the storage creates a name once: of several commands started together, one wins
        study = optuna.create_study(directions=directions, sampler=sampler(seed), **kw)
        created = True
        _CREATED.add(cfg.study)
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(sampler=sampler(None), **kw), False
    check_objectives(study, [cfg.objective, *cfg.also])
    if created:
        for params in baseline_params(fams):
            study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)
        study.set_user_attr("budget_s", cfg.budget_s)
        study.set_user_attr("files", cfg.files)
    return study


def check_objectives(study, objectives: list[str]) -> None:
    """A resumed study keeps its objectives: Optuna loads a stored study whatever directions are
    asked for, and would then fail every trial whose number of values differs, after training."""
    known = study.user_attrs.get("objectives")
    if known is None and len(study.directions) == len(objectives):  # new, or stored before this check
        study.set_user_attr("objectives", objectives)
    elif known != objectives:
        had = ", ".join(known) if known else f"{len(study.directions)} objective(s)"
        raise ValueError(f"study {study.study_name} optimises {had}, not {', '.join(objectives)}; "
                         f"name a new study with --study")


def parent_run(cfg: StudyConfig, study) -> str | None:
    """One MLflow parent run per study, shared by every worker and every re-run. The command that
    created the study makes it; another one started with it waits for it rather than make a
    second (they would split the trials between two parents)."""
    from search.track import Tracker
    rid = announced_parent(study, wait_s=0 if cfg.study in _CREATED else PARENT_WAIT_S)
    if rid:
        return rid
    t = Tracker(cfg.experiment, f"study-{cfg.study}", tracking_uri=cfg.tracking_uri,
                local_dir=Path("runs") / cfg.study, system_metrics=False,
                tags={"optuna.study": cfg.study, "kind": "study", "files": ",".join(cfg.files)})
    t.start()
    t.log_params({"budget_s": cfg.budget_s, "trial_budget_s": cfg.trial_budget_s,
                  "objective": cfg.objective, "also": ",".join(cfg.also), "size": cfg.size,
                  "pruner": cfg.pruner})
    study.set_user_attr("mlflow_parent_run_id", t.run_id or "")  # "": offline, stop waiting
    _PARENT.append(t)  # ended by report.finish when this process's share of the study is done
    return t.run_id


def announced_parent(study, wait_s: float) -> str | None:
    """The study's parent run id; a brand-new study (nothing finished yet) gets up to `wait_s`
    for the command that created it to announce one ("" when that command is offline)."""
    deadline = time.monotonic() + wait_s
    while True:
        attrs = study.user_attrs  # read from the storage on each access
        if "mlflow_parent_run_id" in attrs:
            return attrs["mlflow_parent_run_id"] or None
        if time.monotonic() >= deadline or any(t.state.is_finished() for t in
                                               study.get_trials(deepcopy=False)):
            return None
        time.sleep(0.5)


def worker(cfg: StudyConfig, index: int, fams: dict | None = None, study=None) -> None:
    """One optimisation loop; with several GPUs, worker i uses GPU i. A spawned worker loads the
    graphs and the study itself; the in-process one reuses the caller's."""
    import optuna
    import torch
    if torch.cuda.is_available() and cfg.workers > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    if study is None:
        fams = load_families(cfg)
        study = open_study(cfg, fams, seed=None)
    callbacks = [stop_when_spent(cfg), halt_on_repeated_failure()]
    if cfg.trials:
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED))
    # What is loaded by now (torch, MLflow, Optuna, SQLAlchemy, the graphs: ~560,000 objects)
    # lives as long as the process. Frozen, the collector no longer walks it, so the collection
    # that frees each trial's model takes 0.03 s instead of 0.33 s (CPU machine), twice a trial.
    gc.collect()
    gc.freeze()
    study.optimize(Objective(cfg, fams), callbacks=callbacks, catch=(Exception,),  # TrialFailed and crashes alike: recorded, the study goes on
                   gc_after_trial=True)


REPEATS_TO_HALT = 5   # trials in a row failing with the same error stop the study
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def halt_on_repeated_failure(repeats: int = REPEATS_TO_HALT):
    """Stop the study when the last `repeats` finished trials all failed with one error: what
    fails every graph alike (a lost device, a broken install, data gone mid-study) is not a
    trial's fault, and each retry would only record it again. The reason goes to the study's
    `halted` attribute, which the command reports with exit status 3."""
    def callback(study, trial):
        error = trial.user_attrs.get("error")
        if trial.state != TrialState.FAIL or not error:
            return
        last = sorted(study.get_trials(deepcopy=False, states=FINISHED),
                      key=lambda t: t.datetime_complete or t.datetime_start)[-repeats:]
        if len(last) == repeats and all(t.state == TrialState.FAIL and
                                        t.user_attrs.get("error") == error for t in last):
            study.set_user_attr("halted", f"the last {repeats} trials ({', '.join(str(t.number) for t in last)}) "
                                          f"all failed with: {error}")
            study.stop()
    return callback


def stop_when_spent(cfg: StudyConfig):
    from search.study import used_device_s

    def callback(study, trial):
        if used_device_s(study) >= cfg.budget_s * 0.98:
            study.stop()
    return callback


def _spawn_workers(cfg: StudyConfig) -> int:
    """Run the workers; how many of them died (a crash outside a trial, or a kill)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(cfg, i)) for i in range(cfg.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    for i, code in dead:
        print(f"worker {i} exited with code {code}; its running trial is failed by the heartbeat "
              f"check and the study can be resumed", file=sys.stderr)
    return len(dead)


def parse_args(argv=None) -> StudyConfig:
    ap = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n\n")[1])
    ap.add_argument("files", nargs="*", metavar="FILE")
    ap.add_argument("--size", help="graph size (default: tiny for the default study)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", dest="sets")
    ap.add_argument("--budget", default=None, help="device time of the whole study (default 3m30s "
                                                   "for the default study, else 1h)")
    ap.add_argument("--trial-budget", default=None, help="training time per trial (default 20s "
                                                         "for the default study, else 5m)")
    ap.add_argument("--trial-tokens", help="train each trial on this many tokens instead of a time")
    ap.add_argument("--trial-bytes", help="train each trial on this many bytes of text instead of a "
                    "time: BPE and byte (BLT) families see the same text")
    ap.add_argument("--trials", type=int, help="stop after this many finished trials")
    ap.add_argument("--objective", default="val_bpb", choices=["val_bpb", "val_loss"])
    ap.add_argument("--also", action="append", default=[], choices=["params", "tok_s"],
                    help="more objectives (multi-objective: the Pareto front is reported)")
    ap.add_argument("--study", help="study name (default: from the graph names and size)")
    ap.add_argument("--storage", help="Optuna storage URL (default sqlite:///optuna.db here)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    ap.add_argument("--seeds", type=int, default=0, help="re-run the top trials with K seeds")
    ap.add_argument("--data", help="token shards folder, raw_u16:DIR, or builtin (default)")
    ap.add_argument("--pruner", default="sh", choices=["sh", "hyperband", "median", "wilcoxon", "none"])
    ap.add_argument("--max-params", type=parse_count, help="pre-flight cap on parameters")
    ap.add_argument("--experiment", default="playground")
    ap.add_argument("--evals", type=int, default=None, help="evaluations (pruning rungs) per trial "
                    "(default 3 for the default study, else 4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--heartbeat", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--eval-bytes", type=parse_count, help=argparse.SUPPRESS)  # tests: a shorter span
    a = ap.parse_args(argv)
    default_study = not a.files
    files = a.files or default_files()
    size = a.size or ("tiny" if default_study else None)
    budget = parse_duration(a.budget or ("3m30s" if default_study else "1h"))
    trial_budget = None if (a.trial_tokens or a.trial_bytes) and not a.trial_budget else \
        parse_duration(a.trial_budget or ("20s" if default_study else "5m"))
    names = "+".join(Path(f).stem for f in files)
    study = a.study or f"{names}-{size or 'default'}"
    return StudyConfig(files=[str(f) for f in files], study=study,
                       storage=a.storage or f"sqlite:///{Path('optuna.db').resolve()}", size=size,
                       sets=tuple(a.sets), budget_s=budget, trial_budget_s=trial_budget,
                       trial_tokens=parse_count(a.trial_tokens) if a.trial_tokens else None,
                       trial_bytes=parse_count(a.trial_bytes) if a.trial_bytes else None,
                       trials=a.trials, objective=a.objective, also=tuple(a.also), workers=a.workers,
                       seeds=a.seeds, data=a.data, pruner=a.pruner, max_params=a.max_params,
                       experiment=a.experiment, device=a.device, evals=a.evals or (3 if default_study else 4),
                       eval_bytes=a.eval_bytes or (8192 if default_study else None),
                       heartbeat_s=a.heartbeat)


def main(argv=None) -> int:
    from search import report
    try:
        cfg = parse_args(argv)
        fams = load_families(cfg)
        check_data(cfg, fams)
        study = open_study(cfg, fams)
    except (GraphError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError and
        print(e, file=sys.stderr)                              # TokenizerMissing a FileNotFoundError
        return 2
    study.set_user_attr("halted", None)   # a halt of an earlier command is not this one's
    cfg = replace(cfg, parent_run_id=parent_run(cfg, study))
    each = [format_duration(cfg.trial_budget_s)] if cfg.trial_budget_s else []
    each += [f"{cfg.trial_tokens:,} tokens"] if cfg.trial_tokens else []
    each += [f"{cfg.trial_bytes:,} bytes of text"] if cfg.trial_bytes else []
    print(f"study {cfg.study}: {', '.join(fams)}; budget {format_duration(cfg.budget_s)} of device "
          f"time, {' or '.join(each) or 'no limit'} per trial; storage {cfg.storage}", file=sys.stderr)
    dead = 0
    if cfg.workers > 1:
        dead = _spawn_workers(cfg)
    else:
        worker(cfg, 0, fams, study)
    settle_dead_trials(study)
    if cfg.seeds and not study.user_attrs.get("halted"):
        report.reseed(cfg, study)
    print(report.summary(cfg, study))
    report.finish(cfg, study, _PARENT[0] if _PARENT else None)
    halted = study.user_attrs.get("halted")
    if halted:
        print(f"study {cfg.study} stopped: {halted}", file=sys.stderr)
        return 3
    return 1 if dead else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
