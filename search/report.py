"""The end of a study: the summary table, the best graph as a concrete YAML file, seeds.

`reseed` re-trains the best trials and the baseline with K seeds and says whether the winner
beats the baseline beyond noise: by more than twice the standard error of the difference of
the means (an approximate 95% test; with K < 3 the answer is 'not enough seeds').
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

import graphs
from search.study import StudyConfig


def _value(t):
    return t.values[0] if t.values else None


def _short(params: dict, width: int = 48) -> str:
    text = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items() if k != "graph")
    return text if len(text) <= width else text[: width - 1] + "…"


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


def summary(cfg: StudyConfig, study) -> str:
    rs = rows(study)
    best = {t.number for t in study.best_trials} if any(r["state"] == "COMPLETE" for r in rs) else set()
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
    trained = sum(t.user_attrs.get("train_s", 0) for t in study.get_trials(deepcopy=False))
    finished = sum(1 for r in rs if r["state"] in ("COMPLETE", "PRUNED", "FAIL") and r["device_s"])
    rate = finished / (used / 3600) if used else 0.0
    lines.append(f"* best{' (Pareto front)' if cfg.also else ''}, b baseline; device time used "
                 f"{used:.0f}s of {cfg.budget_s:.0f}s, {100 * trained / max(used, 1e-9):.0f}% of it in "
                 f"training steps; {rate:.0f} trials per device-hour")
    return "\n".join(lines)


def best_graph_yaml(cfg: StudyConfig, trial) -> str:
    fam = trial.user_attrs["graph"]
    multi = len(cfg.families) > 1
    params = {k.split(":", 1)[1] if multi else k: v for k, v in trial.params.items() if k != "graph"}
    f = cfg.families[fam]
    g = graphs.load(f, cfg.size, cfg.family_sets[f]).resolve(params)
    header = (f"# best graph of study {cfg.study}: trial {trial.number}, {cfg.objective} "
              f"{_value(trial):.4f}, graph hash {trial.user_attrs.get('graph_hash')}\n")
    return header + yaml.safe_dump(g.data, sort_keys=False)


def finish(cfg: StudyConfig, study, parent=None) -> Path:
    out = Path("studies") / cfg.study
    out.mkdir(parents=True, exist_ok=True)
    text = summary(cfg, study)
    (out / "summary.txt").write_text(text + "\n")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    written = []
    if complete:
        for i, t in enumerate(study.best_trials):
            path = out / ("best.yaml" if len(study.best_trials) == 1 else f"best-{i}.yaml")
            path.write_text(best_graph_yaml(cfg, t))
            written.append(path)
        print(f"best graph: {', '.join(map(str, written))}")
    if parent is not None:
        parent.log_text(text, "summary.txt")
        for p in written:
            parent.log_artifact(str(p))
        if complete and not cfg.also:
            parent.log_metrics({"best/" + cfg.objective: study.best_value,
                                "trials/complete": len(complete),
                                "trials/total": len(study.get_trials(deepcopy=False))}, 0)
        parent.end("completed")
    return out


def reseed(cfg: StudyConfig, study, top: int = 2) -> dict:
    """Train the top trials and the baseline again with seeds 1..K; report mean and spread."""
    from search.setup import RunConfig
    from search.train import run_training
    complete = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                      key=_value)
    if not complete:
        return {}
    chosen = complete[:top] + [t for t in complete if t.user_attrs.get("baseline") and t not in complete[:top]]
    results = {}
    for t in chosen:
        fam = t.user_attrs["graph"]
        multi = len(cfg.families) > 1
        params = {k.split(":", 1)[1] if multi else k: v for k, v in t.params.items() if k != "graph"}
        vals = []
        for seed in range(1, cfg.seeds + 1):
            f = cfg.families[fam]
            r = run_training(RunConfig(graph=f, size=cfg.size,
                                       sets=cfg.family_sets[f],
                                       params=params, budget_s=cfg.trial_budget_s, max_tokens=cfg.trial_tokens,
                                       data=cfg.data, seed=seed, evals=1, eval_bytes=cfg.eval_bytes,
                                       device=cfg.device, experiment=cfg.experiment, progress=False,
                                       run_name=f"{cfg.study}-trial-{t.number}-seed-{seed}",
                                       parent_run_id=cfg.parent_run_id, tracking_uri=cfg.tracking_uri,
                                       out=f"runs/{cfg.study}/trial-{t.number}-seed-{seed}",
                                       tags={"optuna.study": cfg.study, "optuna.trial": str(t.number),
                                             "seed": str(seed)}))
            if r.val_bpb is not None:
                vals.append(r.val_bpb if cfg.objective == "val_bpb" else r.val_loss)
        results[t.number] = vals
        study.set_user_attr(f"seeds_{t.number}", vals)
    print(seed_report(results, [t.number for t in chosen if t.user_attrs.get("baseline")]))
    return results


def seed_report(results: dict, baselines: list) -> str:
    lines = ["seeds: trial  mean  std  n"]
    stats = {}
    for n, vals in results.items():
        if vals:
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            stats[n] = (statistics.mean(vals), sd, len(vals))
            lines.append(f"       {n:>5}  {stats[n][0]:.4f}  {sd:.4f}  {len(vals)}")
    if baselines and stats:
        b = baselines[0]
        win = min(stats, key=lambda k: stats[k][0])
        if win == b or b not in stats:
            lines.append("the baseline is the best configuration")
        else:
            (mw, sw, nw), (mb, sb, nb) = stats[win], stats[b]
            if min(nw, nb) < 3:
                lines.append(f"trial {win} vs baseline {b}: not enough seeds to judge (need >= 3)")
            else:
                se = math.sqrt(sw ** 2 / nw + sb ** 2 / nb)
                verdict = "beats" if mb - mw > 2 * se else "does not beat"
                lines.append(f"trial {win} {verdict} the baseline beyond noise: {mw:.4f} vs {mb:.4f} "
                             f"(difference {mb - mw:.4f}, 2 x s.e. {2 * se:.4f})")
    return "\n".join(lines)
