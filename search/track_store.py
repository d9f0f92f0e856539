"""The MLflow side of `search.track.Tracker`: opening the run, the flusher that sends what the
training thread queued, holding it while the store is down and replaying it when it is back.

It lives apart so that `search.track` reads as what a caller uses (start, log, end) and this file
as how the store is reached and survived. The limits and timeouts of the store's side live here
(tests set them on this module); `search.track` re-exports `TrackingWarning` and the batch
limits. A SQLite store's creation and its lock are in search.sqlite_store. Nothing here imports
`mlflow` at module level.
"""
from __future__ import annotations

import hashlib
import importlib.util
import posixpath
import random
import re
import socket
import sys
import threading
import time
import warnings
from contextlib import suppress
from itertools import islice
from typing import Any, Callable

from search.sqlite_store import SQLITE_TIMEOUT_S, create_sqlite_store, sqlite_path, store_lock

# MLflow's cap of 1000 metrics per batch, and its limit on a tag's value
METRICS_PER_BATCH = 1000
TAG_VALUE_LIMIT = 8000
FLUSH_INTERVAL_S = 2.0   # the flusher sends what the training thread queued this often
# offline mid-run: how often the flusher asks whether the store is back, how long it waits for the
# answer, and what it holds meanwhile (a held value costs ~150 bytes; the jsonl has them all)
RETRY_EVERY_S = 5.0
HEALTH_TIMEOUT_S = 2.0
BACKLOG_LIMIT = 100_000  # metric values
HELD_CALLS_LIMIT = 1_000  # params, tags and artifact calls


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a request; the run goes on."""


# MLflow's rule for metric, param and tag keys (a bad key would make it refuse the whole batch)
_KEY = re.compile(r"[\w./\- :]{1,250}")
# error codes of a request the store refused (a bad value, a param re-logged with another value):
# the store works, so the run stays online
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}


class StoreLink:
    """The part of a Tracker that talks to MLflow, as a mixin: its state (client, run id, queues,
    the offline flag and lock) is made in `Tracker.__init__`."""

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

    # ---- opening the run

    def _import_mlflow(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._mlflow = {"MlflowClient": MlflowClient, "Metric": Metric, "Param": Param, "RunTag": RunTag}

    @property
    def _store_uri(self) -> str:
        # a busy timeout for the sqlite3 connection; MLflow's own PRAGMA (20 s) covers only its
        # sessions, not the schema migration a fresh database gets
        uri = self.tracking_uri
        if sqlite_path(uri) is not None and "?" not in uri:
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
        attempts = 6 if sqlite_path(self.tracking_uri) else 1
        for attempt in range(attempts):
            try:
                with store_lock(self.tracking_uri):
                    create_sqlite_store(self.tracking_uri)
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
        db = sqlite_path(self.tracking_uri)
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

            limit = TAG_VALUE_LIMIT
            return {k: truncate(str(v), limit) for k, v in resolve_tags(tags).items()}
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

    # ---- the flusher thread

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

    # ---- offline: holding, asking, recovering

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
        say(f"MLflow tracking at {self.tracking_uri} is back after {self.outages[-1]:.1f} s: sent "
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


# ---- reaching the store: quick answers about a store that may be down, without `import mlflow`


def truncate(value: str, limit: int) -> str:
    """`value` cut to at most `limit` characters, ending with a marker saying how much was cut."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value)} chars]"
    return value[: limit - len(marker)] + marker


def probe(uri: str, timeout: float) -> None:
    """Raise OSError when nothing takes a TCP connection at the URI's host and port: far quicker
    than MLflow's HTTP retries, and it needs no `import mlflow`."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(uri)
    if parts.scheme in getproxies() and not proxy_bypass(parts.hostname or ""):
        return  # reached through a proxy: leave it to the HTTP client
    port = parts.port or (443 if parts.scheme == "https" else 80)
    socket.create_connection((parts.hostname, port), timeout=timeout).close()


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


def _alive(monitor: Any) -> bool:
    thread = getattr(monitor, "_process", None)  # MLflow's name for the monitor's thread
    return thread is not None and thread.is_alive()


def bounded(fn: Callable, timeout: float) -> bool:
    """Run `fn` on a daemon thread; whether it finished within `timeout` seconds."""
    worker = threading.Thread(target=_quietly, args=(fn,), daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def say(message: str) -> None:
    print(f"tracking: {message}", file=sys.stderr, flush=True)
