"""One Optuna trial: sample a concrete graph from the YAML markers, check it before spending
device time, train it for an equal slice of time, report to the pruner, and contain failures.

Device time is counted per trial as its wall time on the device (set-up, compilation, training
and evaluation included) and summed over the study's trials in storage, so several workers share
one budget; a running trial counts what it has used so far. A finished trial's user attribute
`time` splits that wall time by phase (`search.phases`), and the study's summary sums them.
"""
from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, field

import optuna
import torch

import graphs
from graphs.cost import analyse
from search.phases import Phases
from search.setup import RunConfig
from search.train import run_training


@dataclass
class StudyConfig:
    files: list[str]
    study: str
    storage: str
    size: str | None = None
    sets: tuple = ()
    budget_s: float = 270.0                 # the whole study's device time
    trial_budget_s: float | None = 25.0     # each trial's training time (equal cost)
    trial_tokens: int | None = None         # or equal tokens
    trial_bytes: int | None = None          # or equal bytes of text (BPE and byte models alike)
    trials: int | None = None
    objective: str = "val_bpb"              # or val_loss
    also: tuple = ()                        # extra objectives: params, tok_s
    workers: int = 1
    seeds: int = 0
    data: str | None = None
    pruner: str = "sh"
    max_params: float | None = None
    experiment: str = "playground"
    device: str = "auto"
    evals: int = 4
    eval_bytes: int | None = None
    heartbeat_s: int = 10
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    families: dict = field(default_factory=dict)   # name -> file, filled by load_families
    family_sets: dict = field(default_factory=dict)  # file -> its share of `sets`, likewise


class TrialFailed(Exception):
    """A trial that ended without a value (diverged, failed); the study goes on."""


def family_sets(files: list[str], sets) -> dict[str, tuple]:
    """Each file's share of --set: a bare `var=value` goes to the files that have that variable
    (so `n_kv_head=4` can tune llama beside gpt2); paths and unknown names go to every file, where
    the loader reports them."""
    from graphs.yamlsrc import load_file
    names = {f: set((load_file(f)[0].get("vars") or {})) for f in files}
    out = {}
    for f in files:
        mine = []
        for item in sets:
            key = item.partition("=")[0].strip()
            if "." in key or key in names[f] or not any(key in n for n in names.values()):
                mine.append(item)
        out[f] = tuple(mine)
    return out


def load_families(cfg: StudyConfig) -> dict[str, graphs.Graph]:
    fams = {}
    cfg.family_sets.update(family_sets(cfg.files, cfg.sets))
    for f in cfg.files:
        g = graphs.load(f, cfg.size, cfg.family_sets[f])
        if g.name in fams:
            raise ValueError(f"two graph files are named {g.name!r}")
        fams[g.name] = g
        cfg.families[g.name] = f
    return fams


def check_data(cfg: StudyConfig, fams: dict) -> None:
    """Open every family's tokenizer and data before any trial: a missing tokenizer or data set
    is the command's error (TokenizerMissing, DataError), not each trial's. On the GPU, a study
    without the GPT-2 ranks failed 1,500 trials in 5 minutes, each with the same message. The
    built-in corpus is tokenised here once, outside the trials' device time."""
    from search.data import open_dataset
    seen = set()
    for g in fams.values():
        tokenizer = "gpt2" if graphs.elaborate(g.resolve()).input == "tokens" else "bytes"
        if tokenizer not in seen:
            seen.add(tokenizer)
            open_dataset(cfg.data, tokenizer)


def param_name(family: str, dim: str, multi: bool) -> str:
    return f"{family}:{dim}" if multi else dim


def sample(trial: optuna.Trial, fams: dict) -> tuple[str, dict]:
    """Define-by-run: the family, then its markers; children only when their option is chosen."""
    names = list(fams)
    multi = len(names) > 1
    fam = trial.suggest_categorical("graph", names) if multi else names[0]
    chosen: dict = {}
    for d in fams[fam].space():
        if d.parent is not None and chosen.get(d.parent[0]) != d.parent[1]:
            continue
        p = param_name(fam, d.name, multi)
        if d.kind == "choice":
            v = trial.suggest_categorical(p, list(d.choices))
        elif d.kind == "int":
            v = trial.suggest_int(p, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            v = trial.suggest_float(p, float(d.low), float(d.high), step=d.step, log=d.log)
        chosen[d.name] = v
    return fam, chosen


def baseline_params(fams: dict) -> list[dict]:
    """The unmodified graphs (every marker at its default), one per family."""
    out = []
    multi = len(fams) > 1
    for fam, g in fams.items():
        chosen, params = {}, {"graph": fam} if multi else {}
        for d in g.space():
            if d.parent is not None and chosen.get(d.parent[0]) != d.parent[1]:
                continue
            chosen[d.name] = d.default
            params[param_name(fam, d.name, multi)] = d.default
        out.append(params)
    return out


def used_device_s(study: optuna.Study, exclude: int | None = None) -> float:
    now = time.time()
    total = 0.0
    for t in study.get_trials(deepcopy=False):
        if t.number == exclude:
            continue
        if "device_s" in t.user_attrs:
            total += t.user_attrs["device_s"]
        elif t.state == optuna.trial.TrialState.RUNNING and "started" in t.user_attrs:
            total += now - t.user_attrs["started"]
    return total


PRUNER_REASON = "pruner: "   # how a trial that the pruner stopped states its reason
BUDGET_RAN_OUT = "the study's device-time budget ran out mid-trial"
BUDGET_CHECK_S = 5.0         # a running trial asks the storage for the study's spending this often


def _same_graph(study, trial, digest):
    """An earlier trial of the same graph that settles this one: complete (its value is taken),
    running (wait for it rather than train it twice) or stopped by the pruner (the same graph
    trains to the same curve, so it would be stopped again). A graph that failed, or whose trial
    the budget cut short, is trained again."""
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or t.user_attrs.get("graph_hash") != digest:
            continue
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING) or \
                str(t.user_attrs.get("prune_reason", "")).startswith(PRUNER_REASON):
            return t
    return None


class Objective:
    """Callable for `study.optimize`: returns the objective value(s) of one trial."""

    def __init__(self, cfg: StudyConfig, fams: dict):
        self.cfg, self.fams = cfg, fams
        self.multi = bool(cfg.also)

    def __call__(self, trial: optuna.Trial):
        study = trial.study
        clock = Phases()   # the trial's wall time by phase; Optuna's part (here) is `study`
        started = time.time()
        try:
            with clock("study"):
                trial.set_user_attr("started", started)
                trial.set_user_attr("pid", os.getpid())
                if torch.cuda.is_available():  # what earlier trials of this worker left on the device
                    trial.set_user_attr("cuda_bytes_at_start", torch.cuda.memory_allocated())
                return self._run(trial, study, started, clock)
        finally:
            with clock("teardown"):
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            split = clock.split()   # seconds per phase (search.phases); they sum to the wall time
            trial.set_user_attr("device_s", sum(split.values()))
            trial.set_user_attr("time", split)

    def _run(self, trial, study, started, clock):
        cfg = self.cfg
        fam, params = sample(trial, self.fams)
        with clock("setup"):
            plan = graphs.elaborate(self.fams[fam].resolve(params))
        trial.set_user_attr("graph", fam)
        trial.set_user_attr("graph_hash", plan.hash)
        twin = _same_graph(study, trial, plan.hash)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin.number)
            if twin.state == optuna.trial.TrialState.COMPLETE:
                trial.set_user_attr("status", "duplicate")
                return twin.values if self.multi else twin.value
            if twin.state == optuna.trial.TrialState.PRUNED:
                for step, value in sorted(twin.intermediate_values.items()):  # what TPE ranks it by
                    trial.report(value, step=step)
                self._prune(trial, f"same graph as trial {twin.number}, which the pruner stopped")
            self._prune(trial, f"same graph as running trial {twin.number}")
        remaining = cfg.budget_s - used_device_s(study, exclude=trial.number)
        if remaining <= 0:
            study.stop()
            self._prune(trial, "the study's device-time budget is spent")
        with clock("setup"):
            cost = analyse(plan)
            reason = self._preflight(plan, cost, remaining)
        trial.set_user_attr("params", cost.params)
        trial.set_user_attr("flops_per_token", cost.flops_per_token)
        if reason and "budget" in reason:
            study.stop()
        if reason:
            self._prune(trial, "pre-flight: " + reason)
        with clock("setup"):
            torch._dynamo.reset()  # a fresh compilation state per trial: no silent eager fallback
        budget = None if cfg.trial_budget_s is None else min(cfg.trial_budget_s, remaining)
        run = RunConfig(graph=cfg.families[fam], size=cfg.size,
                        sets=cfg.family_sets[cfg.families[fam]], params=params,
                        budget_s=budget, max_tokens=cfg.trial_tokens,
                        max_bytes=cfg.trial_bytes, data=cfg.data, seed=0,
                        evals=cfg.evals, eval_bytes=cfg.eval_bytes, device=cfg.device,
                        experiment=cfg.experiment, run_name=f"{cfg.study}-trial-{trial.number}",
                        parent_run_id=cfg.parent_run_id, tracking_uri=cfg.tracking_uri,
                        progress=False, checkpoint=True, out=f"runs/{cfg.study}/trial-{trial.number}",
                        resumable=False,  # a retried trial is a new trial that starts afresh
                        tags={"optuna.study": cfg.study, "optuna.trial": str(trial.number)})
        failure = None
        try:
            with clock("other"):  # what run_training does not name is not Optuna's
                result = run_training(run, on_eval=self._on_eval(trial, started, clock), phases=clock,
                                      should_stop=self._budget_spent(trial, started, clock))
        except Exception as e:
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            failure = f"trial {trial.number} failed: {type(e).__name__}: {e}"
            # The frames of a failed run hold its model, optimiser and activations (after a CUDA
            # out-of-memory error, all of the device): drop them before the next trial starts.
            traceback.clear_frames(e.__traceback__)
        if failure is not None:
            with clock("teardown"):
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            raise TrialFailed(failure)
        self._record(trial, result)
        if result.status == "pruned":
            raise optuna.TrialPruned(trial.user_attrs.get("prune_reason", "pruned by the pruner"))
        if result.status != "completed" or result.val_bpb is None:
            raise TrialFailed(f"trial {trial.number} {result.status}: {result.message}")
        value = result.val_bpb if cfg.objective == "val_bpb" else result.val_loss
        if not self.multi:
            return value
        extra = {"params": float(trial.user_attrs["params"]), "tok_s": result.tok_s or 0.0}
        return [value] + [extra[k] for k in cfg.also]

    def _preflight(self, plan, cost, remaining) -> str | None:
        cfg = self.cfg
        if cfg.max_params and cost.params > cfg.max_params:
            return f"{cost.params:,} parameters exceed the cap of {cfg.max_params:,.0f}"
        if torch.cuda.is_available():
            need = cost.train_state_bytes + cost.act_bytes_per_seq * plan.training.micro_batch
            have = torch.cuda.get_device_properties(0).total_memory
            if need > 0.9 * have:
                return f"needs about {need / 2**30:.1f} GiB, the GPU has {have / 2**30:.1f} GiB"
        if cfg.trial_budget_s and remaining < 0.25 * cfg.trial_budget_s:
            return f"only {remaining:.0f} s of the study budget left, less than a quarter trial"
        return None

    def _prune(self, trial, reason: str):
        trial.set_user_attr("status", "pruned")
        trial.set_user_attr("prune_reason", reason)
        raise optuna.TrialPruned(reason)

    def _budget_spent(self, trial, started, clock: Phases):
        """Asked at the trial's log points: has the study's device time run out? Other workers'
        trials spend it too, so a trial given what was left at its start can overrun it (two
        commands on one H100 used 888 s of a 780 s budget when it was checked at evaluations
        only). Reads the storage at most every BUDGET_CHECK_S seconds."""
        last, every_s = [time.monotonic()], BUDGET_CHECK_S

        def spent() -> bool:
            if time.monotonic() - last[0] < every_s:
                return False
            last[0] = time.monotonic()
            with clock("study"):
                return self._out_of_budget(trial, started)
        return spent

    def _out_of_budget(self, trial, started) -> bool:
        """The study's device time is spent, this trial's so far included: say so on the trial."""
        if self.cfg.budget_s - used_device_s(trial.study, exclude=trial.number) - (time.time() - started) > 0:
            return False
        trial.set_user_attr("prune_reason", BUDGET_RAN_OUT)
        return True

    def _on_eval(self, trial, started, clock: Phases | None = None):
        clock = clock or Phases()
        evals = 0

        def report(tokens: int, metrics: dict) -> bool:
            nonlocal evals
            evals += 1
            with clock("study"):
                return self._report(trial, started, evals, tokens, metrics)
        return report

    def _report(self, trial, started, evals: int, tokens: int, metrics: dict) -> bool:
        """Evaluation `evals` to Optuna; True to stop the trial (pruned, or the budget is spent)."""
        cfg = self.cfg
        if self._out_of_budget(trial, started):
            return True
        if self.multi:
            return False  # Optuna prunes single-objective studies only
        value = metrics["val/bpb"] if cfg.objective == "val_bpb" else metrics["val/loss"]
        # the step is the evaluation's index, not the tokens seen: trials train for equal time,
        # so evaluation k of every trial comes after the same training time (with equal tokens,
        # after the same tokens) and the pruners compare like with like at the same step; token
        # steps differ between architectures, which left the median pruner nothing to compare
        # and stacked all of successive halving's rungs onto the first evaluation
        trial.report(value, step=evals)
        trial.set_user_attr(f"tokens_at_eval_{evals}", tokens)
        if evals < cfg.evals and trial.should_prune():   # after the last, nothing is left to save
            trial.set_user_attr("prune_reason", f"{PRUNER_REASON}{cfg.objective} {value:.4f} at "
                                                f"evaluation {evals} of {cfg.evals} ({tokens:,} tokens)")
            return True
        return False

    def _record(self, trial, r) -> None:
        for k in ("status", "val_bpb", "val_loss", "tok_s", "mfu", "train_s", "compile_s", "eval_s",
                  "tokens", "run_id"):
            v = getattr(r, k)
            if v is not None:
                trial.set_user_attr("mlflow_run_id" if k == "run_id" else k, v)
