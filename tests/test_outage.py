"""Issue 12, outages: the MLflow server dies in the middle of a training and comes back. Training
goes on, and afterwards the server holds every metric of the run's jsonl exactly once.

A real `mlflow server` (one worker, no job runner) on a SQLite store in tmp_path; the training is
`python -m search.train` at `tiny` size in a subprocess, as a user runs it. The figures it prints
(run with -s) are the ones in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
GPT2 = str(ROOT / "graphs" / "gpt2.yaml")


class Server:
    """`mlflow server` on 127.0.0.1:`port` over `tmp/mlflow.db`; killed, not stopped, to make an
    outage: no goodbye to the clients, requests in flight are cut."""

    def __init__(self, tmp: Path, port: int):
        self.tmp, self.port, self.proc = tmp, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90) -> float:
        """Seconds until it answers /health."""
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner processes
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp}/mlflow.db",
               "--artifacts-destination", str(self.tmp / "artifacts")]
        log = open(self.tmp / "server.log", "a")
        began = time.monotonic()
        # its own process group: the CLI starts uvicorn as a child, and both must go
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        while not self.healthy():
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() - began < timeout, "mlflow server did not come up"
            time.sleep(0.2)
        return time.monotonic() - began

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is None:
            return
        with_group = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait()
        for _ in range(100):  # the uvicorn child can outlive the CLI for a moment
            try:
                os.killpg(with_group, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError("mlflow server's processes did not go")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(path: Path) -> list[dict]:
    """The jsonl's complete lines (the trainer may be half way through writing the last)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def train_lines(path: Path) -> int:
    return sum("train/loss" in line["metrics"] for line in lines(path))


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_server_killed_and_restarted_mid_training_gets_every_metric_once(tmp_path):
    began = time.monotonic()
    server = Server(tmp_path, free_port())
    run_dir, err = tmp_path / "run", tmp_path / "train.err"
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.url, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the budget counts training steps only; it outlasts the outage even on an idle machine
    cmd = [sys.executable, "-m", "search.train", GPT2, "--size", "tiny", "--budget", "35s",
           "--log-every", "1", "--evals", "3", "--eval-bytes", "4096", "--no-progress",
           "--out", str(run_dir)]
    figures = {}
    try:
        figures["server_start_s"] = server.start()
        with open(err, "w") as stderr:
            train = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        from mlflow import MlflowClient
        client = MlflowClient(server.url)
        jsonl = run_dir / "metrics.jsonl"

        def sent_before_outage() -> bool:
            exp = client.get_experiment_by_name("playground")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 2

        wait_for(lambda: train_lines(jsonl) >= 2 and sent_before_outage(), "metrics on the server", train)
        server.kill()
        killed_at, before = time.time(), train_lines(jsonl)
        # long enough for the tracker to notice (a failed send: ~3 s of MLflow's retries)
        wait_for(lambda: train_lines(jsonl) >= before + 3 and time.time() - killed_at > 6, "training", train)
        restarted_at = time.time()
        figures["server_restart_s"] = server.start()
        back_at = time.time()
        out, _ = train.communicate(timeout=300)
        assert train.returncode == 0, out[-2000:] + err.read_text()[-3000:]
        figures["server_down_s"] = back_at - killed_at

        # every (key, step) of the jsonl is on the server exactly once
        local = lines(jsonl)
        expected = Counter((k, line["step"]) for line in local for k in line["metrics"])
        run_id = json.loads((run_dir / "result.json").read_text())["run_id"]
        got = Counter((m.key, m.step) for key in {k for k, _ in expected}
                      for m in client.get_metric_history(run_id, key))
        assert got == expected, (expected - got, got - expected)
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed")
        assert {"graph.yaml", "run_config.json"} <= {f.path for f in client.list_artifacts(run_id)}
    finally:
        server.kill()

    stderr_text = err.read_text()
    warned = [line for line in stderr_text.splitlines() if "TrackingWarning" in line]
    assert len(warned) == 1 and "sent when the store answers again" in warned[0], warned
    back = [line for line in stderr_text.splitlines() if "is back after" in line]
    assert len(back) == 1, stderr_text[-3000:]
    assert "still offline" not in stderr_text
    last_line = max(line["time"] for line in local)
    figures.update(
        during_outage=sum(len(line["metrics"]) for line in local if killed_at <= line["time"] <= back_at),
        lines_during_outage=sum(killed_at <= line["time"] <= back_at for line in local),
        metrics_total=sum(expected.values()),
        tracker_offline_s=float(back[0].split("is back after ")[1].split(" s")[0]),
        recovered=int(back[0].split("sent ")[1].split(" metric values")[0]),
        trained_after_restart_s=last_line - restarted_at,
        test_s=time.monotonic() - began,
    )
    print("\n".join(["", *warned, *back]))
    print("outage figures:", json.dumps({k: round(v, 1) for k, v in figures.items()}))
    assert figures["during_outage"] > 0 and figures["recovered"] >= figures["during_outage"]
