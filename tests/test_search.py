"""The architecture search end to end on the CPU: the default study and failures contained.
Workers sharing one study (SQLite and a real PostgreSQL server) are in tests/test_concurrency.py;
search workers killed with SIGKILL at random points are in tests/test_crash.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
GPT2 = str(ROOT / "graphs" / "gpt2.yaml")
LLAMA = str(ROOT / "graphs" / "llama.yaml")


def env_for(tmp: Path, **extra) -> dict:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def search(tmp: Path, *args, wait=True, **env):
    cmd = [sys.executable, "-m", "search.run", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp, env=env_for(tmp, **env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=tmp, env=env_for(tmp, **env), capture_output=True, text=True,
                          timeout=900)


def trials(tmp: Path, study: str, storage: str | None = None):
    import optuna
    return optuna.load_study(study_name=study, storage=storage or f"sqlite:///{tmp}/optuna.db").trials


def test_default_study_finishes_in_five_minutes_with_tracked_trials(default_study):
    out, tmp_path = default_study, default_study.folder
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.seconds < 300, out.seconds                    # 5 minutes, start-up included
    assert "study ngpt-tiny" in out.stdout and "best graph:" in out.stdout
    best = tmp_path / "studies" / "ngpt-tiny" / "best.yaml"
    assert best.exists() and "graph hash" in best.read_text()
    import graphs
    assert graphs.loads(best.read_text()).concrete             # a concrete graph, ready to train

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("playground")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) >= 4, len(children)
    with_curves = [c for c in children if len(client.get_metric_history(c.info.run_id, "val/bpb")) >= 2]
    assert len(with_curves) >= 4
    ts = trials(tmp_path, "ngpt-tiny")
    assert ts[0].user_attrs.get("baseline")                  # the unmodified graph came first
    for c in children:
        n = int(c.data.tags["optuna.trial"])
        assert ts[n].user_attrs.get("graph_hash") == c.data.tags["graph_hash"]


def test_nan_and_raising_trials_are_recorded_and_the_study_goes_on(tmp_path):
    out = search(tmp_path, GPT2, "--size", "tiny", "--trials", "4", "--trial-tokens", "4096",
                 "--budget", "10m", "--study", "f", "--pruner", "none",
                 PLAYGROUND_FAULT="1:nan@2,2:raise@1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ts = trials(tmp_path, "f")
    assert ts[1].state.name == "FAIL" and ts[1].user_attrs["status"] == "diverged"
    assert ts[2].state.name == "FAIL" and "injected failure" in ts[2].user_attrs["error"]
    assert "Traceback" in ts[2].user_attrs["traceback"]
    assert [t.state.name for t in ts].count("COMPLETE") >= 2
    assert "diverged" in out.stdout and "injected failure" in out.stdout

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.data.tags.get("optuna.trial"): r for r in
            client.search_runs([client.get_experiment_by_name("playground").experiment_id])}
    assert runs["1"].info.status == "FAILED" and runs["1"].data.tags["status"] == "diverged"
    assert runs["2"].info.status == "FAILED"
    assert "error.txt" in {a.path for a in client.list_artifacts(runs["2"].info.run_id)}
