"""Tracking: one MLflow run per training run; a study's trials nest under the study's parent run.

Metrics are appended to `local_dir/metrics.jsonl` (written on the calling thread, on disk within
~2 s and at `end()`) and sent to MLflow by a background thread, so a training step never waits for
the store and nothing is lost without it. MLflow is best effort. A store that cannot be reached at
`start()` leaves the run local-only. One lost mid-run gives one `TrackingWarning`; the run goes
on, the flusher holds what it could not send (metrics up to `BACKLOG_LIMIT` values, then the
oldest stay in the jsonl only; params, tags and artifacts in call order) and asks every
`RETRY_EVERY_S` whether the store is back (a `GET /health` of a server, bounded by
`HEALTH_TIMEOUT_S`). When it is, the backlog goes out in batches, in logging order, and one line on
stderr says so. Re-sending is safe: a metric keeps the timestamp it was logged with, and MLflow's
SQL stores drop a (key, value, timestamp, step) they already hold. `end()` waits at most
`END_TIMEOUT_S` and says how many metric values stayed local-only. `mlflow` is imported only
inside functions, so importing this module is cheap.

This file is what callers use; how the run reaches MLflow (opening it, the flusher, holding and
replaying through an outage) is `search.track_store.StoreLink`, with the limits and timeouts of that side
(`BACKLOG_LIMIT`, `RETRY_EVERY_S`, `HEALTH_TIMEOUT_S`, ...).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.track_store import (METRICS_PER_BATCH, TAG_VALUE_LIMIT, StoreLink, TrackingWarning,  # noqa: F401
                                 bounded, probe, say, truncate)

# MLflow's own caps (mlflow.utils.validation): 100 params or tags and 1000 metrics per batch.
PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000
PROBE_TIMEOUT_S = 3.0  # start(): a server that takes no TCP connection in this long is down
# start(): a server that takes the connection gets this long to answer; generous, because a fresh
# server migrates its database on the first request (5-8 s on a 2-core machine)
START_TIMEOUT_S = 15.0
END_TIMEOUT_S = 10.0  # end() waits this long for the last metrics, tags and status
# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) keep retrying a dead server
# for about 4 minutes; with these a refused request fails in about 3 s, so a server that dies
# mid-run sends the run offline quickly. Set for this process only, where the user has not.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# our run statuses -> MLflow's RunStatus; MLflow's own words are accepted too
STATUSES = {
    "completed": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "pruned": "KILLED",
}
_OUR_WORD = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "interrupted"}


def param_key(key: str) -> str:
    """A parameter's key as MLflow takes it: a graph path's `[name]` selector becomes `:name`
    (`nodes.pmap[patch_fixed].stride` -> `nodes.pmap:patch_fixed.stride`) and any other character
    MLflow refuses becomes `_`, so a sampled choice is never dropped for its spelling."""
    key = key.replace("[", ":").replace("]", "")
    return re.sub(r"[^\w./\- :]", "_", key)


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists to dotted keys with string values: {"a": {"b": [1]}} -> {"a.b.0": "1"}."""
    if not isinstance(d, Mapping):
        raise TypeError(f"flatten expects a mapping, got {type(d).__name__}")
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            items = value.items()
        elif isinstance(value, (list, tuple)) and value:
            items = enumerate(value)
        else:
            out[key] = str(value)
            return
        for k, v in items:
            walk(v, f"{key}.{k}" if key else str(k))

    walk(d, prefix)
    return out


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else `mlflow.db` in the working directory (never `./mlruns`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _chunks(items: list, n: int):
    return (items[i : i + n] for i in range(0, len(items), n))


class Tracker(StoreLink):
    """One MLflow run; a context manager (`with Tracker(...) as t:`) that ends it on the way out."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        *,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        local_dir: Path,
        enabled: bool = True,
        system_metrics: bool = True,
    ):
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.parent_run_id, self.tags = parent_run_id, dict(tags or {})
        self.local_dir, self.enabled = Path(local_dir), enabled
        self.system_metrics = system_metrics
        self.jsonl = self.local_dir / "metrics.jsonl"
        self._client = self._run_id = self._file = self._flusher = self._monitor = None
        self._mlflow: dict[str, Any] = {}
        self._offline = False
        self._state = "new"  # new -> running -> ended
        self._lock = threading.Lock()
        self._pending: deque = deque()  # (timestamp_ms, step, {key: value}) waiting for the flusher
        self._queued = 0
        # the flusher's own: (key, value, timestamp_ms, step) to send, oldest first
        self._held: deque = deque()
        self._held_calls: list = []  # (what, client method, args, kwargs) made while offline
        self._dropped = self._dropped_calls = 0  # over the limits: never sent
        self._down_since = self._next_try = 0.0
        self._recovered_before = 0
        self.recovered = 0  # metric values sent after an outage
        self.outages: list[float] = []  # seconds each outage the run came back from lasted
        self._key_ok: dict[str, bool] = {}
        self._wake, self._stop = threading.Event(), threading.Event()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def offline(self) -> bool:
        """True while MLflow cannot be reached (or for good: disabled, not started, failed at start)."""
        return self._client is None or self._offline

    @property
    def local_only(self) -> int:
        """Metric values not (yet) sent: those over the backlog limit and those still held."""
        queued = sum(len(values) for _, _, values in list(self._pending))
        return self._dropped + len(self._held) + queued

    # ---- lifecycle

    def start(self) -> Tracker:
        """Open the local jsonl, then (enabled) get or create the experiment and start the run."""
        if self._state != "new":
            raise RuntimeError(f"tracker already {self._state}")
        self._state = "running"
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # a large buffer: the flusher writes it out (see _flush), the training thread never does
        self._file = open(self.jsonl, "a", encoding="utf-8", buffering=1 << 20)
        if not self.enabled:
            return self
        remote = self.tracking_uri.startswith(("http://", "https://"))
        if remote:
            try:
                probe(self.tracking_uri, PROBE_TIMEOUT_S)
            except (OSError, ValueError) as exc:
                self._go_offline("start", exc)
                return self
            for name, value in HTTP_ENV.items():
                os.environ.setdefault(name, value)
        self._import_mlflow()  # seconds on first use; not counted against the start deadline
        if remote:
            worker = threading.Thread(target=self._open_run, daemon=True, name="tracker-start")
            worker.start()
            worker.join(START_TIMEOUT_S)
            if worker.is_alive():
                self._go_offline("start", TimeoutError(f"no answer in {START_TIMEOUT_S:g} s"))
        else:
            self._open_run()
        if not self.offline:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True, name="tracker-flush")
            self._flusher.start()
            self._start_system_metrics()
        return self

    def end(self, status: str = "completed") -> None:
        """Flush (bounded wait), tag `status` with our word and terminate the run; still offline,
        say on stderr how many metric values stayed local-only (the run stays RUNNING in MLflow)."""
        word, mlflow_status = _status(status)
        if self._state != "running":
            self._state = "ended"
            return
        self._state = "ended"
        self._stop.set()  # the flusher sends what is queued (offline: tries once more) and exits
        self._wake.set()
        if self._client is not None:
            if not bounded(lambda: self._finish(word, mlflow_status), END_TIMEOUT_S):
                self._go_offline("end", TimeoutError(f"no answer in {END_TIMEOUT_S:g} s"))
            if self._offline:
                say(f"MLflow tracking at {self.tracking_uri} still offline at the run's end: "
                    f"{self.local_only} metric values stayed local-only (the jsonl has them all: "
                    f"{self.jsonl}){self._calls_note()}; the run stays RUNNING in MLflow")
        self._file.close()

    def _finish(self, word: str, mlflow_status: str) -> None:
        self._flusher.join()
        if self._monitor is not None:
            self._monitor.finish()
        self.set_tags({"status": word})
        if not self._offline:
            self._call("end", self._client.set_terminated, self._run_id, mlflow_status)

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("completed")
        else:
            self.end("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    # ---- logging

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one jsonl line and queue the values for MLflow; never waits for the store.

        Non-finite values are kept: MLflow accepts them (SQL stores keep NaN, clamp +-inf to
        +-1.8e308), and the jsonl holds NaN/Infinity as Python's json writes them.
        """
        if self._state != "running":
            raise RuntimeError(f"log_metrics on a tracker that is {self._state}")
        now = time.time()
        values = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": now, "metrics": values}) + "\n")
        if self._flusher is None:
            self._file.flush()
        else:  # online or not, the flusher decides what to do with them
            if not all(map(self._sendable, values)):
                values = {k: v for k, v in values.items() if self._key_ok[k]}
            self._pending.append((int(now * 1000), int(step), values))
            self._queued += len(values)
            if self._queued >= METRICS_PER_BATCH:
                self._wake.set()

    def flush_local(self) -> None:
        """Write the jsonl's buffered lines out now (the flusher does it every ~2 s): a caller about
        to record that its metrics are logged, e.g. in a checkpoint, calls this first."""
        if self._file is not None and not self._file.closed:
            self._file.flush()

    # params, tags and artifacts go to MLflow only: no-ops without a run (disabled, not started,
    # failed at start), held while the store is unreachable

    def log_params(self, params: Mapping) -> None:
        """Flattened to dotted keys, stringified, long values truncated, in batches of 100."""
        if self._client is None:
            return
        Param = self._mlflow["Param"]
        flat = ((param_key(k), v) for k, v in flatten(params).items())
        items = [Param(k, truncate(v, PARAM_VALUE_LIMIT)) for k, v in flat if self._sendable(k)]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._send("log_params", "log_batch", params=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._client is None:
            return
        RunTag = self._mlflow["RunTag"]
        items = [RunTag(k, truncate(str(v), TAG_VALUE_LIMIT)) for k, v in tags.items() if self._sendable(k)]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._send("set_tags", "log_batch", tags=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._client is not None:
            self._send("log_text", "log_text", text, artifact_file)

    def log_dict(self, d: Mapping, artifact_file: str) -> None:
        """JSON or YAML by the file's extension."""
        if self._client is not None:
            self._send("log_dict", "log_dict", dict(d), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Held while offline as a path: the file is read when the store is back."""
        if self._client is not None:
            self._send("log_artifact", "log_artifact", str(path), artifact_path)


def _status(status: str) -> tuple[str, str]:
    """(our word, MLflow status) for one of ours or one of MLflow's."""
    if status in STATUSES:
        return status, STATUSES[status]
    if status.upper() in _OUR_WORD:
        return _OUR_WORD[status.upper()], status.upper()
    raise ValueError(f"unknown run status {status!r}; use one of {', '.join([*STATUSES, *_OUR_WORD])}")
