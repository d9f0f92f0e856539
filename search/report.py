"""The end of a study: the summary table, the Pareto front, the best graph as a concrete YAML
file, and the seed check.

`reseed` re-trains the best trials and the baseline with seeds 1..K (the search trained every
trial with seed 0, so the winner's own lucky draw is not counted) and says whether the winner
beats the baseline beyond noise: by more than twice the standard error of the difference of
the means (an approximate 95% test; with K < 3 the answer is 'not enough seeds').
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import yaml

import graphs
from search.phases import PHASES
from search.study import StudyConfig

# the summary's words for the phases of search.phases
PHASE_WORDS = {"setup": "set-up", "compile": "compile", "train": "training", "eval": "evaluation",
               "sync": "waiting for queued steps", "log": "logging",
               "checkpoint": "checkpoints", "track": "tracking", "study": "Optuna",
               "teardown": "teardown", "other": "other"}


def _value(t):
    return t.values[0] if t.values else None


def _short(params: dict, width: int = 48) -> str:
    text = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items() if k != "graph")
    return text if len(text) <= width else text[: width - 1] + "…"


def _distinct(trials) -> list:
    """One trial per concrete graph, best first objective first, earliest first on ties: a
    duplicate trial returns its twin's values, so it would otherwise appear twice."""
    seen, out = set(), []
    for t in sorted(trials, key=lambda t: (t.values[0], t.number)):
        h = t.user_attrs.get("graph_hash", t.number)
        if h not in seen:
            seen.add(h)
            out.append(t)
    return out


def front(study) -> list:
    """The Pareto front (with one objective: the best value), one trial per graph, ordered by the
    first objective; front(study)[0] is the best graph. Optuna's best_trials lists ties (and so
    duplicates) as several trials even with one objective."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return []
    return _distinct(study.best_trials)


def rows(study) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        status = a.get("status") or t.state.name.lower()
        if t.state.name == "FAIL" and status == "completed":
            status = "failed"
        out.append({"trial": t.number, "status": status, "state": t.state.name,
                    "graph": a.get("graph", "?"), "hash": a.get("graph_hash", "")[:8],
                    "params": _short(t.params), "value": _value(t), "tok_s": a.get("tok_s"),
                    "device_s": a.get("device_s"), "baseline": bool(a.get("baseline")),
                    "note": a.get("prune_reason") or a.get("error") or
                    (f"duplicate of {a['duplicate_of']}" if "duplicate_of" in a else "")})
    return out


def device_shares(study, used: float) -> dict[str, float]:
    """Where the study's device time went, in percent, by phase (`search.phases`: training steps,
    compilation, evaluation, set-up, tracking, checkpoints, Optuna, ...). A trial without a `time`
    attribute (recorded before phases were) counts its training, compilation and evaluation;
    `other` is the rest of `used`."""
    part = dict.fromkeys(PHASES, 0.0)
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        split = a.get("time") or {k: a.get(f"{k}_s", 0) for k in ("train", "compile", "eval")}
        for k, v in split.items():
            if k in part and k != "other":
                part[k] += v
    part["other"] = max(used - sum(part.values()), 0.0)
    return {k: 100 * v / max(used, 1e-9) for k, v in part.items()}


def _shares_text(share: dict[str, float]) -> str:
    """The phases other than training, largest first: 'evaluation 40%, compile 6%, ...'."""
    rest = sorted(((v, k) for k, v in share.items() if k not in ("train", "sync") and v >= 0.5),
                  reverse=True)
    return ", ".join(f"{PHASE_WORDS[k]} {v:.0f}%" for v, k in rest) or "nothing else"


def late_rises(study, rel: float = 0.05) -> list[tuple]:
    """Completed trials whose final evaluation is more than `rel` worse than the best one they
    reached earlier: (trial, best value, its tokens, final value, final tokens). On a corpus that
    a trial's budget passes over many times the validation score rises again (overfitting), and
    the study ranks such trials by a number worse than they reached: the summary says so."""
    out = []
    for t in study.get_trials(deepcopy=False):
        # steps are evaluation indices; their tokens are user attributes (studies from before
        # that change reported tokens as the step)
        a = t.user_attrs
        iv = sorted((a.get(f"tokens_at_eval_{k}", k), v) for k, v in t.intermediate_values.items())
        if t.state.name != "COMPLETE" or len(iv) < 2 or "duplicate_of" in t.user_attrs:
            continue
        (best_at, best), (last_at, last) = min(iv, key=lambda kv: kv[1]), iv[-1]
        if best_at < last_at and last > best * (1 + rel):
            out.append((t.number, best, best_at, last, last_at))
    return out


def _rise_warning(rises: list[tuple], completed: int, objective: str) -> str:
    n, best, best_at, last, last_at = max(rises, key=lambda r: r[3] / r[1])
    return (f"warning: {objective} rose again late in {len(rises)} of {completed} completed trials "
            f"(trial {n}: {best:.4f} at {best_at / 1e6:.1f}M tokens, then {last:.4f} at "
            f"{last_at / 1e6:.1f}M): they overfit the training data (a small corpus seen many "
            f"times) or became unstable. Trials are ranked by their final value, so this study "
            f"compares overtrained models: train on more data (--data) or use a shorter "
            f"--trial-budget.")


def summary(cfg: StudyConfig, study) -> str:
    rs = rows(study)
    best = {t.number for t in front(study)}
    head = f"{'trial':>5}  {'status':<10} {'graph':<8} {'hash':<8}  {cfg.objective:>8}  {'tok/s':>9}  " \
           f"{'device':>7}  params / note"
    lines = [f"study {cfg.study}: {len(rs)} trials", head, "-" * len(head)]
    for r in rs:
        mark = "*" if r["trial"] in best else ("b" if r["baseline"] else " ")
        val = f"{r['value']:.4f}" if r["value"] is not None else "-"
        tok = f"{r['tok_s']:,.0f}" if r["tok_s"] else "-"
        dev = f"{r['device_s']:.0f}s" if r["device_s"] else "-"
        note = r["params"] + (f"  [{r['note'][:60]}]" if r["note"] else "")
        lines.append(f"{r['trial']:>4}{mark}  {r['status']:<10} {r['graph']:<8} {r['hash']:<8}  {val:>8}  "
                     f"{tok:>9}  {dev:>7}  {note}")
    used = sum(r["device_s"] or 0 for r in rs)
    share = device_shares(study, used)
    finished = sum(1 for r in rs if r["state"] in ("COMPLETE", "PRUNED", "FAIL") and r["device_s"])
    rate = finished / (used / 3600) if used else 0.0
    training = share["train"] + share["sync"]   # a queued step's wait is the device training
    queued = f", {share['sync']:.0f}% waiting for queued steps at log points" if share["sync"] >= 0.5 else ""
    lines.append(f"* best{' (Pareto front)' if cfg.also else ''}, b baseline; device time used "
                 f"{used:.0f}s of {cfg.budget_s:.0f}s, {training:.0f}% of it in training steps{queued} "
                 f"({_shares_text(share)}); {rate:.0f} trials per device-hour")
    rises = late_rises(study)
    if rises:
        completed = sum(1 for r in rs if r["state"] == "COMPLETE")
        lines.append(_rise_warning(rises, completed, cfg.objective))
    if cfg.also and best:
        lines += ["", *front_table(cfg, study)]
    if "seeds" in study.user_attrs:
        lines += ["", seed_report(study.user_attrs["seeds"])]
    return "\n".join(lines)


def _fmt(name: str, v: float) -> str:
    return f"{v:.4f}" if name in ("val_bpb", "val_loss") else f"{v:,.0f}"  # params, tok_s


def front_table(cfg: StudyConfig, study) -> list[str]:
    names = [cfg.objective, *cfg.also]
    ts = front(study)
    lines = [(f"Pareto front of {', '.join(names)} ({len(ts)} graphs); best.yaml is trial "
              f"{ts[0].number}, the lowest {cfg.objective} on the front"),
             f"{'trial':>5}  " + "  ".join(f"{n:>12}" for n in names)]
    for t in ts:
        vals = "  ".join(f"{_fmt(n, v):>12}" for n, v in zip(names, t.values))
        lines.append(f"{t.number:>5}  {vals}")
    return lines


def _graph_params(cfg: StudyConfig, trial) -> tuple[str, dict]:
    """The graph file and marker values of a trial (family prefixes dropped)."""
    multi = len(cfg.families) > 1
    params = {k.split(":", 1)[1] if multi else k: v for k, v in trial.params.items() if k != "graph"}
    return cfg.families[trial.user_attrs["graph"]], params


def best_graph_yaml(cfg: StudyConfig, trial) -> str:
    f, params = _graph_params(cfg, trial)
    g = graphs.load(f, cfg.size, cfg.family_sets[f]).resolve(params)
    values = ", ".join(f"{n} {_fmt(n, v)}" for n, v in zip([cfg.objective, *cfg.also], trial.values))
    header = (f"# best graph of study {cfg.study}: trial {trial.number}, {values}, "
              f"graph hash {trial.user_attrs.get('graph_hash')}\n")
    return header + yaml.safe_dump(g.data, sort_keys=False)


def write_best(cfg: StudyConfig, study, out: Path) -> list[Path]:
    """best.yaml is the front's lowest first objective; with several objectives every other
    graph on the front is written as front-trial-N.yaml beside it."""
    ts = front(study)
    written = []
    for i, t in enumerate(ts if cfg.also else ts[:1]):
        path = out / ("best.yaml" if i == 0 else f"front-trial-{t.number}.yaml")
        path.write_text(best_graph_yaml(cfg, t))
        written.append(path)
    if written:
        why = f"the lowest {cfg.objective} on the Pareto front" if cfg.also else f"the lowest {cfg.objective}"
        more = f"; the rest of the front: {', '.join(map(str, written[1:]))}" if written[1:] else ""
        print(f"best graph: {written[0]} (trial {ts[0].number}, {why}){more}")
    return written


def finish(cfg: StudyConfig, study, parent=None) -> Path:
    out = Path("studies") / cfg.study
    out.mkdir(parents=True, exist_ok=True)
    text = summary(cfg, study)
    (out / "summary.txt").write_text(text + "\n")
    written = write_best(cfg, study, out)
    if parent is not None:
        parent.log_text(text, "summary.txt")
        for p in written:
            parent.log_artifact(str(p))
        if written:
            trials = study.get_trials(deepcopy=False)
            parent.log_metrics({"best/" + cfg.objective: _value(front(study)[0]),
                                "trials/complete": sum(t.state.name == "COMPLETE" for t in trials),
                                "trials/total": len(trials)}, 0)
        parent.end("completed")
    return out


def _chosen(study, top: int) -> tuple[list, list]:
    """The `top` distinct graphs by the first objective plus every family's baseline (also when
    the search pruned it: the comparison needs it); and which of those are baselines."""
    trials = study.get_trials(deepcopy=False)
    best = _distinct([t for t in trials if t.state.name == "COMPLETE"])[:top]
    hashes = {t.user_attrs.get("graph_hash") for t in best}
    base = [t for t in trials if t.user_attrs.get("baseline") and "graph" in t.user_attrs
            and t.state.name in ("COMPLETE", "PRUNED")]
    chosen = best + [t for t in base if t.user_attrs.get("graph_hash") not in hashes]
    base_hashes = {t.user_attrs.get("graph_hash") for t in base}  # a later twin stands for it
    return chosen, [t for t in chosen if t.user_attrs.get("graph_hash") in base_hashes]


def _seed_run(cfg: StudyConfig, trial, seed: int) -> float | None:
    """Train a trial's graph as the search did (same budget and data), with another seed."""
    import torch

    from search.setup import RunConfig
    from search.train import run_training
    f, params = _graph_params(cfg, trial)
    torch._dynamo.reset()  # as for each trial: a fresh compilation state, no silent eager fallback
    name = f"trial-{trial.number}-seed-{seed}"
    run = RunConfig(graph=f, size=cfg.size, sets=cfg.family_sets[f], params=params,
                    budget_s=cfg.trial_budget_s, max_tokens=cfg.trial_tokens,
                    max_bytes=cfg.trial_bytes, data=cfg.data, seed=seed,
                    evals=1, eval_bytes=cfg.eval_bytes, device=cfg.device, experiment=cfg.experiment,
                    progress=False, checkpoint=False,  # a seed run is measured, never resumed
                    run_name=f"{cfg.study}-{name}", parent_run_id=cfg.parent_run_id,
                    tracking_uri=cfg.tracking_uri, out=f"runs/{cfg.study}/{name}",
                    tags={"optuna.study": cfg.study, "optuna.trial": str(trial.number),
                          "seed": str(seed), "kind": "seed"})
    try:
        r = run_training(run)
    except Exception as e:  # noqa: BLE001 - contained like a failed trial: other seeds still count
        print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if r.status != "completed" or r.val_bpb is None:
        return None
    return r.val_bpb if cfg.objective == "val_bpb" else r.val_loss


def reseed(cfg: StudyConfig, study, top: int = 2) -> dict:
    """Train the top trials and the baseline again with seeds 1..K; the results go to the
    study's user attribute `seeds`, which the summary reports (mean, spread, n, verdict)."""
    chosen, base = _chosen(study, top)
    if not chosen:
        return {}
    started = time.time()
    results = {str(t.number): [v for seed in range(1, cfg.seeds + 1)
                               if (v := _seed_run(cfg, t, seed)) is not None] for t in chosen}
    record = {"objective": cfg.objective, "seeds": list(range(1, cfg.seeds + 1)), "results": results,
              "baselines": [str(t.number) for t in base], "device_s": time.time() - started}
    study.set_user_attr("seeds", record)
    return record


def seed_report(record: dict) -> str:
    """Mean, spread (sample standard deviation) and n per re-seeded trial, then the verdict."""
    results, baselines = record["results"], record["baselines"]
    lines = [(f"seeds {record['seeds'][0]}..{record['seeds'][-1]} ({record['objective']}; "
              f"{record['device_s']:.0f}s of device time beyond the study budget)"),
             f"{'trial':>7}  {'mean':>8}  {'± sd':>8}  {'n':>2}"]
    stats = {}
    for n, vals in results.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        stats[n] = (statistics.mean(vals), sd, len(vals)) if vals else None
        mark = " b" if n in baselines else "  "
        mean = f"{stats[n][0]:.4f}" if vals else "-"
        spread = f"{sd:.4f}" if len(vals) > 1 else "-"
        lines.append(f"{n:>5}{mark}  {mean:>8}  {spread:>8}  {len(vals):>2}" +
                     ("" if vals else "  (every seed failed)"))
    lines.append("verdict: " + _verdict({n: s for n, s in stats.items() if s}, baselines))
    return "\n".join(lines)


def _verdict(stats: dict, baselines: list) -> str:
    base = [b for b in baselines if b in stats]
    if not base or not stats:
        return "no baseline result to compare with"
    b = min(base, key=lambda k: stats[k][0])      # the strongest baseline when there are several
    win = min(stats, key=lambda k: stats[k][0])
    if win in baselines:
        return f"no trial beats the baseline (trial {win} has the lowest mean)"
    (mw, sw, nw), (mb, sb, nb) = stats[win], stats[b]
    if min(nw, nb) < 3:
        return (f"trial {win} {mw:.4f} vs baseline {b} {mb:.4f}: not enough seeds to judge "
                f"(need >= 3 each)")
    se = math.sqrt(sw ** 2 / nw + sb ** 2 / nb)
    word = "beats" if mb - mw > 2 * se else "does not beat"
    return (f"trial {win} {word} the baseline beyond noise: {mw:.4f} vs {mb:.4f} "
            f"(difference {mb - mw:.4f}, 2 x s.e. {2 * se:.4f})")
