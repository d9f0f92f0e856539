"""Reading Optuna studies: names, one study's trials as a table, its budget, best trials against
the baseline, seed statistics, and Optuna's own Plotly figures.

The storage URL defaults to `sqlite:///optuna.db` in the working directory, as `python -m
search.run` uses; a SQLite file that does not exist is `EmptyStore` (never created).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from app.store import EmptyStore, StoreError, brief, sqlite_file


def default_storage() -> str:
    return f"sqlite:///{Path('optuna.db').resolve()}"


def _storage(url: str):
    import optuna

    db = sqlite_file(url)
    if db is not None and not db.is_file():
        raise EmptyStore(f"no Optuna storage at {db}")
    try:
        kw = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgresql") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, skip_compatibility_check=True,
                                          skip_table_creation=True)
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot open the Optuna storage at {url}: {brief(e)}") from None


def study_names(url: str) -> list[str]:
    import optuna

    storage = _storage(url)
    try:
        names = optuna.get_all_study_names(storage=storage)
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot read studies from {url}: {brief(e)}") from None
    if not names:
        raise EmptyStore(f"the Optuna storage at {url} has no studies")
    return sorted(names)


def load(url: str, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=_storage(url))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot load study {name} from {url}: {brief(e)}") from None


def trials_table(study) -> pd.DataFrame:
    """One row per trial (search.report's rows, which the CLI summary prints too) plus seed."""
    from search.report import rows

    df = pd.DataFrame(rows(study))
    if df.empty:
        return df
    values = {t.number: list(t.values or []) for t in study.get_trials(deepcopy=False)}
    names = study.user_attrs.get("objectives") or [f"objective {i}" for i in range(len(study.directions))]
    for i, name in enumerate(names[1:], start=1):  # extra objectives of multi-objective studies
        df[name] = [values[n][i] if len(values[n]) > i else None for n in df["trial"]]
    return df.rename(columns={"value": names[0]})


def overview(study) -> dict:
    """Budget used against the study's budget, and trial counts by Optuna state and by status."""
    trials = study.get_trials(deepcopy=False)
    used = sum(t.user_attrs.get("device_s", 0.0) for t in trials)
    trained = sum(t.user_attrs.get("train_s", 0.0) for t in trials)
    states: dict = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"trials": len(trials), "budget_s": study.user_attrs.get("budget_s"), "used_s": used,
            "train_s": trained, "states": states, "objectives": study.user_attrs.get("objectives"),
            "directions": [d.name.lower() for d in study.directions],
            "parent_run": study.user_attrs.get("mlflow_parent_run_id")}


def best_vs_baseline(study, top: int = 5) -> pd.DataFrame:
    """The best distinct graphs (the Pareto front with several objectives) and every baseline,
    with the difference of the first objective to the best baseline, and seed statistics."""
    from search.report import front

    trials = study.get_trials(deepcopy=False)
    best = front(study)[:top]
    base = [t for t in trials if t.user_attrs.get("baseline") and t.values]
    ref = min((t.values[0] for t in base), default=None)
    seeds = (study.user_attrs.get("seeds") or {}).get("results", {})
    out, seen = [], set()
    for t, role in [(t, "best") for t in best] + [(t, "baseline") for t in base]:
        if t.number in seen:
            continue
        seen.add(t.number)
        v = t.values[0] if t.values else None
        vals = seeds.get(str(t.number), [])
        out.append({"trial": t.number, "role": "baseline" if t.user_attrs.get("baseline") else role,
                    "graph": t.user_attrs.get("graph"), "hash": (t.user_attrs.get("graph_hash") or "")[:8],
                    "value": v, "vs baseline": (v - ref) if v is not None and ref is not None else None,
                    "seed mean": statistics.mean(vals) if vals else None,
                    "seed sd": statistics.stdev(vals) if len(vals) > 1 else None,
                    "seeds": len(vals), "mlflow run": t.user_attrs.get("mlflow_run_id")})
    return pd.DataFrame(out)


def seed_text(study) -> str | None:
    from search.report import seed_report

    record = study.user_attrs.get("seeds")
    return seed_report(record) if record else None


def figures(study) -> dict:
    """Optuna's Plotly views that apply to this study: name -> figure, or -> the reason it is
    missing (too few finished trials, a single objective for the Pareto front, ...)."""
    import warnings

    import optuna.visualization as vis

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    multi = len(study.directions) > 1
    first = (lambda t: t.values[0]) if multi else None
    name0 = (study.user_attrs.get("objectives") or ["objective"])[0]
    out: dict = {}
    makers = {
        "optimisation history": lambda: vis.plot_optimization_history(study, target=first, target_name=name0),
        "parameter importance": lambda: vis.plot_param_importances(study, target=first, target_name=name0),
        "parallel coordinates": lambda: vis.plot_parallel_coordinate(study, target=first, target_name=name0),
    }
    if multi:
        makers["Pareto front"] = lambda: vis.plot_pareto_front(
            study, target_names=study.user_attrs.get("objectives"))
    for name, make in makers.items():
        if not done:
            out[name] = "no finished trial yet"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = make()
        except Exception as e:  # noqa: BLE001 - e.g. importance needs two trials that differ
            out[name] = f"not available: {brief(e, 200)}"
    if not multi:
        out["Pareto front"] = "single objective: rerun with --also params or --also tok_s for a front"
    return out
