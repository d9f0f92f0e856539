"""Reading the MLflow tracking store: runs as a table, metric histories (downsampled), one run's
details. Plain functions of the tracking URI, so tests can call them directly; the pages wrap
them in `st.cache_data` (see app/ui.py). A run's files (artifacts, run folder) are read by
app/runfiles.py, which keeps every read inside the store's folder.

Every failure to reach the store is raised as `StoreError` with a one-line message, which the
pages show as an error panel; a SQLite store that does not exist yet is `EmptyStore`, never
created (MlflowClient would create an empty database at the path).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from search.track import HTTP_ENV, default_tracking_uri
from search.sqlite_store import ensure_sqlite_store

MAX_RUNS = 5000          # runs read per query; beyond this the table says it is cut
MAX_POINTS = 400         # points per curve after downsampling
PROBE_TIMEOUT_S = 2.0
# downloads of graph.yaml and checkpoints print no progress bars into the server's log
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# columns of the runs table taken from tags, metrics and params (key -> column)
TAG_COLUMNS = {"mlflow.runName": "name", "graph": "graph", "size": "size", "optuna.study": "study",
               "optuna.trial": "trial", "seed": "seed", "kind": "kind", "device": "device"}
METRIC_COLUMNS = {"val/bpb": "val_bpb", "val/loss": "val_loss", "train/loss": "train_loss",
                  "final/tok_s": "tok_s", "budget/gpu_s": "device_s", "time/compile_s": "compile_s",
                  "time/eval_s": "eval_s", "perf/mfu": "mfu", "perf/peak_mem_gb": "peak_mem_gb",
                  "system/system_memory_usage_megabytes": "sys_mem_mb"}


class StoreError(Exception):
    """The store cannot be reached or read; the message says which and why."""


class EmptyStore(StoreError):
    """A SQLite store whose file does not exist: nothing has been tracked there yet."""


def tracking_uri() -> str:
    """The URI the trainer uses: `MLFLOW_TRACKING_URI`, else ./mlflow.db."""
    return default_tracking_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def brief(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_reachable(uri: str) -> None:
    """Fail fast, before MLflow's minutes of HTTP retries: EmptyStore for a missing SQLite file,
    StoreError for a server that takes no TCP connection."""
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        raise EmptyStore(f"no MLflow store at {db}")
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        for name, value in HTTP_ENV.items():  # a dead server should fail in seconds
            os.environ.setdefault(name, value)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot reach the MLflow server at {uri}: {brief(e)}") from None


def client(uri: str):
    from mlflow import MlflowClient

    check_reachable(uri)
    try:
        ensure_sqlite_store(uri)   # a missing SQLite store is made whole, as search.run makes it
        return MlflowClient(uri)
    except Exception as e:  # noqa: BLE001 - any failure to open it is shown, not raised
        raise StoreError(f"cannot open the MLflow store at {uri}: {brief(e)}") from None


def _row(run, experiments: dict) -> dict:
    info, data = run.info, run.data
    row = {"run_id": info.run_id, "experiment": experiments.get(info.experiment_id, info.experiment_id)}
    for key, col in TAG_COLUMNS.items():
        row[col] = data.tags.get(key)
    row["status"] = data.tags.get("status") or info.status.lower()
    row["hash"] = (data.tags.get("graph_hash") or "")[:8]
    row["parent"] = data.tags.get("mlflow.parentRunId")
    row["params"] = _num(data.params.get("params"))
    row["flops_per_token"] = _num(data.params.get("flops_per_token"))
    row["bytes_per_token"] = _num(data.params.get("bytes_per_token"))
    for key, col in METRIC_COLUMNS.items():
        row[col] = data.metrics.get(key)
    if row["tok_s"] is None:
        row["tok_s"] = data.metrics.get("perf/tok_s")
    row["start"] = pd.to_datetime(info.start_time, unit="ms") if info.start_time else None
    for key, value in data.params.items():
        if key.startswith("graph.vars."):
            row["var." + key.removeprefix("graph.vars.")] = value
    return row


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def runs_table(uri: str) -> pd.DataFrame:
    """Every run of every experiment, newest first: names, tags, final metrics and the graph
    variables (`var.*` columns). Raises EmptyStore when the store holds no run."""
    c = client(uri)
    try:
        exps = {e.experiment_id: e.name for e in c.search_experiments()}
        runs = c.search_runs(list(exps), max_results=MAX_RUNS, order_by=["attributes.start_time DESC"])
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot read runs from {uri}: {brief(e)}") from None
    if not runs:
        raise EmptyStore(f"the MLflow store at {uri} has no runs")
    df = pd.DataFrame([_row(r, exps) for r in runs])
    var_cols = [col for col in df.columns if col.startswith("var.")]
    varying = [col for col in var_cols if df[col].nunique(dropna=True) > 1]
    return df.drop(columns=[col for col in var_cols if col not in varying])


def thin(count: int, n: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `n` of `count` points, evenly spaced, the first and the last kept."""
    if count <= n:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, n).round().astype(int))


def history(uri: str, run_id: str, key: str, n: int = MAX_POINTS) -> pd.DataFrame:
    """One metric of one run as columns step, value, time (seconds since the first point),
    sorted by step and thinned to at most `n` points."""
    try:
        ms = client(uri).get_metric_history(run_id, key)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot read {key} of run {run_id}: {brief(e)}") from None
    ms = sorted(ms, key=lambda m: (m.step, m.timestamp))
    ms = [ms[i] for i in thin(len(ms), n)]
    first = ms[0].timestamp if ms else 0
    return pd.DataFrame({"step": [float(m.step) for m in ms], "value": [float(m.value) for m in ms],
                         "time": [(m.timestamp - first) / 1000.0 for m in ms]})


def best_values(uri: str, run_ids: tuple, key: str = "val/bpb") -> dict:
    """The lowest value of `key` over each run's history (the table's final values are the last)."""
    c = client(uri)
    out = {}
    for rid in run_ids:
        try:
            vals = [m.value for m in c.get_metric_history(rid, key)]
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot read {key} of run {rid}: {brief(e)}") from None
        finite = [v for v in vals if np.isfinite(v)]
        out[rid] = min(finite) if finite else None
    return out


def run_detail(uri: str, run_id: str) -> dict:
    """One run: info, tags, params and latest metrics, as plain dicts."""
    try:
        run = client(uri).get_run(run_id)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot read run {run_id}: {brief(e)}") from None
    i = run.info
    info = {"run_id": i.run_id, "name": i.run_name, "experiment_id": i.experiment_id,
            "status": i.status, "start_time": i.start_time, "end_time": i.end_time,
            "artifact_uri": i.artifact_uri}
    return {"info": info, "tags": dict(run.data.tags), "params": dict(run.data.params),
            "metrics": dict(run.data.metrics)}


def artifacts(uri: str, run_id: str) -> list[dict]:
    """Every artifact file of a run: see app/runfiles.py, which confines them to the store."""
    from app import runfiles  # it imports this module

    return runfiles.artifacts(uri, run_id)


def artifact_text(uri: str, run_id: str, path: str) -> str | None:
    """A small text artifact, or None: see app/runfiles.py, which confines it to the store."""
    from app import runfiles

    return runfiles.artifact_text(uri, run_id, path)
