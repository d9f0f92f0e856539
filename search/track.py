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
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import posixpath
import random
import re
import socket
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path
from typing import Any, Callable

# MLflow's own caps (mlflow.utils.validation): 100 params or tags and 1000 metrics per batch.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
FLUSH_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 3.0  # start(): a server that takes no TCP connection in this long is down
# start(): a server that takes the connection gets this long to answer; generous, because a fresh
# server migrates its database on the first request (5-8 s on a 2-core machine)
START_TIMEOUT_S = 15.0
END_TIMEOUT_S = 10.0  # end() waits this long for the last metrics, tags and status
# offline mid-run: how often the flusher asks whether the store is back, how long it waits for the
# answer, and what it holds meanwhile (a held value costs ~150 bytes; the jsonl has them all)
RETRY_EVERY_S = 5.0
HEALTH_TIMEOUT_S = 2.0
BACKLOG_LIMIT = 100_000  # metric values
HELD_CALLS_LIMIT = 1_000  # params, tags and artifact calls
SQLITE_TIMEOUT_S = 30  # sqlite3 busy timeout, also covering MLflow's schema migration
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
# MLflow's rule for metric, param and tag keys (a bad key would make it refuse the whole batch)
_KEY = re.compile(r"[\w./\- :]{1,250}")
# error codes of a request the store refused (a bad value, a param re-logged with another value):
# the store works, so the run stays online
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a request; the run goes on."""


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


def truncate(value: str, limit: int) -> str:
    """`value` cut to at most `limit` characters, ending with a marker saying how much was cut."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value)} chars]"
    return value[: limit - len(marker)] + marker


@contextmanager
def _store_lock(uri: str):
    """Exclusive across processes while one of them sets up a SQLite store (POSIX only). It locks
    the database's folder: no lock file to leave behind, and never the database file itself,
    whose closing would drop SQLite's own locks in this process."""
    db = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows: retries only
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _chunks(items: list, n: int):
    return (items[i : i + n] for i in range(0, len(items), n))


def _sqlite_path(uri: str) -> Path | None:
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path)


class Tracker:
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
                _probe(self.tracking_uri, PROBE_TIMEOUT_S)
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
            if not _bounded(lambda: self._finish(word, mlflow_status), END_TIMEOUT_S):
                self._go_offline("end", TimeoutError(f"no answer in {END_TIMEOUT_S:g} s"))
            if self._offline:
                _say(f"MLflow tracking at {self.tracking_uri} still offline at the run's end: "
                     f"{self.local_only} metric values stayed local-only (the jsonl has them all: "
                     f"{self.jsonl}){self._calls_note()}; the run stays RUNNING in MLflow")
        self._file.close()

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

    # ---- MLflow side

    def _sendable(self, key: str) -> bool:
        """Whether MLflow takes `key`; a bad one gives one warning and stays local."""
        ok = self._key_ok.get(key)
        if ok is None:
            norm = posixpath.normpath(key)
            ok = bool(_KEY.fullmatch(key)) and norm == key
            ok = ok and norm != "." and not norm.startswith(("..", "/"))
            self._key_ok[key] = ok
            if not ok:
                warnings.warn(f"MLflow takes no key {key!r} (letters, digits, _-./: and spaces, "
                              f"a plain relative path); not sent", TrackingWarning, stacklevel=3)
        return ok

    def _import_mlflow(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._mlflow = {"MlflowClient": MlflowClient, "Metric": Metric, "Param": Param, "RunTag": RunTag}

    @property
    def _store_uri(self) -> str:
        # a busy timeout for the sqlite3 connection; MLflow's own PRAGMA (20 s) covers only its
        # sessions, not the schema migration a fresh database gets
        uri = self.tracking_uri
        if _sqlite_path(uri) is not None and "?" not in uri:
            return f"{uri}?timeout={SQLITE_TIMEOUT_S}"
        return uri

    def _open_run(self) -> None:
        """Experiment and run; on the start thread, or a worker when the store is remote."""
        try:
            client, experiment_id = self._connect()
            run = client.create_run(experiment_id, run_name=self.run_name, tags=self._run_tags())
        except Exception as exc:  # noqa: BLE001 - any failure here means: go on without MLflow
            self._go_offline("start", exc)
            return
        with self._lock:
            late = self._offline  # start() gave up waiting: don't leave a RUNNING run behind
            if not late:
                self._client, self._run_id = client, run.info.run_id
        if late:
            _quietly(client.set_terminated, run.info.run_id, "KILLED")

    def _connect(self) -> tuple[Any, str]:
        """Client and experiment id. MLflow migrates a fresh SQLite store when the client is made,
        and processes doing that at once collide ("duplicate column"), as they do on creating the
        experiment: a file lock serialises our own processes, retries cover the others."""
        attempts = 6 if _sqlite_path(self.tracking_uri) else 1
        for attempt in range(attempts):
            try:
                with _store_lock(self.tracking_uri):
                    client = self._mlflow["MlflowClient"](self._store_uri)
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is not None:
                        return client, exp.experiment_id
                    location = self._artifact_location()
                    return client, client.create_experiment(self.experiment, artifact_location=location)
            except Exception:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.25 * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    def _artifact_location(self) -> str | None:
        # MLflow puts a SQLite store's artifacts in ./mlruns of the working directory; keep them
        # next to the database instead, one folder per experiment
        db = _sqlite_path(self.tracking_uri)
        if db is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.experiment).strip("-")[:64] or "experiment"
        digest = hashlib.sha1(self.experiment.encode()).hexdigest()[:8]
        return str((db.parent / "mlartifacts" / f"{slug}-{digest}").resolve())

    def _run_tags(self) -> dict[str, str]:
        tags = {k: str(v) for k, v in self.tags.items()}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        try:  # source, user and git commit, as mlflow.start_run adds them
            from mlflow.tracking.context.registry import resolve_tags

            return {k: truncate(str(v), TAG_VALUE_LIMIT) for k, v in resolve_tags(tags).items()}
        except Exception:  # noqa: BLE001 - context tags are a nicety
            return tags

    def _start_system_metrics(self, resume: bool = False) -> None:
        """MLflow's own monitor (what `start_run(log_system_metrics=True)` starts): `system/...`.
        It stops for good at its first failure, so a run back from an outage starts another that
        goes on from the last step logged (`resume`)."""
        if not self.system_metrics or importlib.util.find_spec("psutil") is None:
            return
        if resume and (self._monitor is None or _alive(self._monitor)):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, resume_logging=resume,
                                                 tracking_uri=self._store_uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001
            self._monitor = None
            warnings.warn(f"system metrics are off: {exc}", TrackingWarning, stacklevel=2)

    def _finish(self, word: str, mlflow_status: str) -> None:
        self._flusher.join()
        if self._monitor is not None:
            self._monitor.finish()
        self.set_tags({"status": word})
        if not self._offline:
            self._call("end", self._client.set_terminated, self._run_id, mlflow_status)

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self._flush()
        self._flush(last=True)

    def _flush(self, last: bool = False) -> None:
        # the jsonl is written out here, not per call: a write syscall on the training thread
        # releases the GIL, and getting it back from a busy flusher costs up to the 5 ms switch
        # interval (measured: 40-130 us per log_metrics call with an 8 KiB buffer, 10 us without)
        with suppress(ValueError):  # closed by an end() that stopped waiting for us
            self._file.flush()
        self._queued = 0
        while self._pending:
            timestamp, step, values = self._pending.popleft()
            self._held.extend((k, v, timestamp, step) for k, v in values.items())
        if self._offline:
            over = len(self._held) - BACKLOG_LIMIT
            for _ in range(over):  # the oldest go: what is held stays one unbroken stretch
                self._held.popleft()
            self._dropped += max(over, 0)
            if not (last or time.monotonic() >= self._next_try):
                return
            self._next_try = time.monotonic() + RETRY_EVERY_S
            if not self._store_answers():
                return
        if self._send_held() and self._offline:
            self._recover()

    def _send_held(self) -> bool:
        """Held metrics out in batches, oldest first; a batch leaves the queue once the store took it."""
        Metric = self._mlflow["Metric"]
        while self._held:
            batch = list(islice(self._held, METRICS_PER_BATCH))
            metrics = [Metric(k, v, timestamp, step) for k, v, timestamp, step in batch]
            if not self._call("log_metrics", self._client.log_batch, self._run_id, metrics=metrics):
                return False
            for _ in batch:
                self._held.popleft()
            if self._offline:
                self.recovered += len(batch)
        return True

    def _recover(self) -> None:
        """The metrics went through: replay the calls made meanwhile, then go on online."""
        with self._lock:
            calls, self._held_calls = self._held_calls, []
        for i, (what, method, args, kwargs) in enumerate(calls):
            if not self._call(what, getattr(self._client, method), self._run_id, *args, **kwargs):
                with self._lock:
                    self._held_calls[:0] = calls[i:]
                return
        with self._lock:
            if self._held_calls:  # made while we replayed: the next round sends them
                return
            self._offline = False
        self.outages.append(time.monotonic() - self._down_since)
        dropped = f", {self._dropped} over the backlog limit stayed local-only" if self._dropped else ""
        _say(f"MLflow tracking at {self.tracking_uri} is back after {self.outages[-1]:.1f} s: sent "
             f"{self.recovered - self._recovered_before} metric values held meanwhile{dropped}"
             f"{self._calls_note()}")
        self._start_system_metrics(resume=True)

    def _store_answers(self) -> bool:
        """A server is asked for its health (no MLflow retries); a local store, for the run."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return _healthy(self.tracking_uri, HEALTH_TIMEOUT_S)
        try:
            self._client.get_run(self._run_id)
        except Exception:  # noqa: BLE001
            return False
        return True

    def _send(self, what: str, method: str, *args, **kwargs) -> None:
        """A client call on the run now, or held while offline (replayed in order on recovery)."""
        for _ in range(2):  # a second time only if the store came back in between
            with self._lock:
                if self._offline:
                    return self._hold((what, method, args, kwargs))
            if self._call(what, getattr(self._client, method), self._run_id, *args, **kwargs):
                return None
        with self._lock:
            return self._hold((what, method, args, kwargs))

    def _hold(self, call: tuple) -> None:
        if len(self._held_calls) < HELD_CALLS_LIMIT:
            self._held_calls.append(call)
        else:
            self._dropped_calls += 1

    def _calls_note(self) -> str:
        n = len(self._held_calls) if self._offline else 0
        parts = [f"{n} param, tag or artifact calls not sent"] if n else []
        if self._dropped_calls:
            parts.append(f"{self._dropped_calls} such calls over the limit dropped")
        return "; " + ", ".join(parts) if parts else ""

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> bool:
        """Every MLflow call after start; False when the store could not be reached (now offline).
        A refused request warns and counts as done: sending it again would not help."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "error_code", None) not in _REFUSED:
                self._go_offline(what, exc)
                return False
            warnings.warn(f"MLflow refused {what}: {_brief(exc)}", TrackingWarning, stacklevel=3)
        return True

    def _go_offline(self, what: str, exc: BaseException) -> None:
        with self._lock:
            if self._offline:
                return
            self._offline = True
            self._down_since = time.monotonic()
            self._next_try = self._down_since + RETRY_EVERY_S
            self._recovered_before = self.recovered
        if self._client is None or what == "end":
            after = f"without it and its metrics are kept in {self.jsonl}"
        else:
            after = (f"and keeps its metrics in {self.jsonl}; they are sent when the store answers "
                     f"again (asked every {RETRY_EVERY_S:g} s)")
        warnings.warn(f"MLflow tracking at {self.tracking_uri} failed ({what}: {_brief(exc)}); the run "
                      f"goes on {after}", TrackingWarning, stacklevel=3)


def _status(status: str) -> tuple[str, str]:
    """(our word, MLflow status) for one of ours or one of MLflow's."""
    if status in STATUSES:
        return status, STATUSES[status]
    if status.upper() in _OUR_WORD:
        return _OUR_WORD[status.upper()], status.upper()
    raise ValueError(f"unknown run status {status!r}; use one of {', '.join([*STATUSES, *_OUR_WORD])}")


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(message: str) -> None:
    print(f"tracking: {message}", file=sys.stderr, flush=True)


def _alive(monitor: Any) -> bool:
    thread = getattr(monitor, "_process", None)  # MLflow's name for the monitor's thread
    return thread is not None and thread.is_alive()


def _healthy(uri: str, timeout: float) -> bool:
    """Whether the server at `uri` answers `GET /health` within `timeout` seconds; any answer
    but a server error counts (a proxy or an auth layer may not know the path)."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def _bounded(fn: Callable, timeout: float) -> bool:
    """Run `fn` on a daemon thread; whether it finished within `timeout` seconds."""
    worker = threading.Thread(target=_quietly, args=(fn,), daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def _probe(uri: str, timeout: float) -> None:
    """Raise OSError when nothing takes a TCP connection at the URI's host and port: far quicker
    than MLflow's HTTP retries, and it needs no `import mlflow`."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(uri)
    if parts.scheme in getproxies() and not proxy_bypass(parts.hostname or ""):
        return  # reached through a proxy: leave it to the HTTP client
    port = parts.port or (443 if parts.scheme == "https" else 80)
    socket.create_connection((parts.hostname, port), timeout=timeout).close()
