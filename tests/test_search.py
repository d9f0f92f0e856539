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
BLT = str(ROOT / "graphs" / "blt.yaml")


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


def test_a_blt_and_gpt2_study_completes_with_nan_and_raising_trials_recorded(tmp_path):
    """Two families at equal training time per trial (BLT on bytes, GPT-2 on tokens, both scored
    in bits per byte), with a diverging and a raising trial among them."""
    out = search(tmp_path, BLT, GPT2, "--size", "tiny", "--trials", "5", "--trial-budget", "3s",
                 "--evals", "2", "--eval-bytes", "16384",
                 "--budget", "10m", "--study", "f", "--pruner", "none",
                 PLAYGROUND_FAULT="2:nan@2,3:raise@1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ts = trials(tmp_path, "f")
    assert [t.user_attrs["graph"] for t in ts[:2]] == ["blt", "gpt2"]        # both baselines first
    for t in ts[:2]:
        assert t.state.name == "COMPLETE" and 0 < t.value < 20, (t.number, t.state, t.value)
    assert ts[2].state.name == "FAIL" and ts[2].user_attrs["status"] == "diverged"
    assert ts[3].state.name == "FAIL" and "injected failure" in ts[3].user_attrs["error"]
    assert "Traceback" in ts[3].user_attrs["traceback"]
    assert ts[4].state.name == "COMPLETE"
    assert "diverged" in out.stdout and "injected failure" in out.stdout

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.data.tags.get("optuna.trial"): r for r in
            client.search_runs([client.get_experiment_by_name("playground").experiment_id])}
    assert runs["2"].info.status == "FAILED" and runs["2"].data.tags["status"] == "diverged"
    assert runs["3"].info.status == "FAILED"
    assert "error.txt" in {a.path for a in client.list_artifacts(runs["3"].info.run_id)}


def test_a_study_whose_every_trial_fails_alike_stops_and_says_why(tmp_path):
    """What fails every graph alike is not a trial's fault: after five such trials in a row the
    study stops with exit status 3 and names the error, instead of failing trials for its whole
    budget (on the GPU, 1,500 in five minutes)."""
    out = search(tmp_path, GPT2, "--size", "tiny", "--trial-budget", "3s", "--budget", "10m",
                 "--study", "h", PLAYGROUND_FAULT="raise@1")
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    ts = trials(tmp_path, "h")
    assert [t.state.name for t in ts] == ["FAIL"] * 5
    assert ("study h stopped: the last 5 trials (0, 1, 2, 3, 4) all failed with: RuntimeError: "
            "injected failure at step 1 (PLAYGROUND_FAULT)") in out.stderr
    again = search(tmp_path, GPT2, "--size", "tiny", "--trial-budget", "3s", "--budget", "10m",
                   "--study", "h", "--trials", "6")    # fixed: the study resumes and goes on
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [t.state.name for t in trials(tmp_path, "h")][5:] == ["COMPLETE"]


def test_a_missing_tokenizer_is_the_commands_error_before_any_trial(tmp_path):
    out = search(tmp_path, GPT2, "--size", "tiny", "--study", "t",
                 LM_PLAYGROUND_HOME=str(tmp_path / "home"), TIKTOKEN_CACHE_DIR=str(tmp_path / "none"))
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GPT-2 tokenizer ranks not found" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "optuna.db").exists()
