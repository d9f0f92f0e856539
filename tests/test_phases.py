"""Where a trial's wall time goes: the phase clock, a real trial's phases in Optuna and in its
MLflow child run, and the study summary's breakdown (issue 5)."""
from __future__ import annotations

import json
import time

import optuna
import pytest

from search import checkpoint
from search.phases import PHASES, Phases
from search.study import Objective, StudyConfig, baseline_params, load_families

from conftest import ROOT

GPT2 = str(ROOT / "graphs" / "gpt2.yaml")


def test_a_phase_inside_another_pauses_it_and_the_phases_sum_to_the_wall_time():
    clock = Phases()
    t0 = time.perf_counter()
    with clock("setup"):
        time.sleep(0.02)
        with clock("track") as inner:
            time.sleep(0.03)
    block = time.perf_counter() - t0
    with pytest.raises(RuntimeError), clock("train"):   # a phase left by an exception ends too
        raise RuntimeError
    split = clock.split()
    assert split["track"] == inner.seconds >= 0.03
    assert split["setup"] >= 0.02
    # not counted twice (that would give >= 0.08 s), and nothing lost; no timing tolerance, so a
    # loaded machine cannot fail it
    assert 0.05 <= split["setup"] + split["track"] <= block
    wall = clock.wall()   # charges the time since split() to `other`, then reads the same instant
    assert sum(clock.seconds.values()) == pytest.approx(wall, rel=1e-9)
    with pytest.raises(ValueError, match="unknown phase"), clock("nap"):
        pass


@pytest.mark.slow
def test_a_trial_records_its_phases_in_optuna_and_in_its_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)   # the trial's run folder is runs/<study>/trial-N
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = StudyConfig(files=[GPT2], study="t", storage=f"sqlite:///{tmp_path}/optuna.db", size="tiny",
                      budget_s=600, trial_budget_s=None, trial_tokens=2048, evals=2, eval_bytes=2048,
                      pruner="none", tracking_uri=uri)
    fams = load_families(cfg)
    study = optuna.create_study(study_name="t", storage=cfg.storage)
    study.enqueue_trial(baseline_params(fams)[0])
    study.optimize(Objective(cfg, fams), n_trials=1)
    t = study.trials[0]
    assert t.state.name == "COMPLETE", t.user_attrs
    a = t.user_attrs
    split = a["time"]
    assert set(split) == set(PHASES) and min(split.values()) >= 0
    assert sum(split.values()) == pytest.approx(a["device_s"])      # the trial's device time, all of it
    for k in ("compile", "eval"):                                    # the trainer's own figures
        assert split[k] == pytest.approx(a[f"{k}_s"], abs=1e-6)
    # the budget: training steps and the waits for steps still queued (the device training)
    assert split["train"] + split["sync"] == pytest.approx(a["train_s"], abs=1e-6)
    for k in ("setup", "checkpoint", "track", "study", "teardown"):
        assert split[k] > 0, k

    m = MlflowClient(uri).get_run(a["mlflow_run_id"]).data.metrics
    logged = {k: m[f"time/{k}_s"] for k in PHASES}
    assert min(logged.values()) >= 0
    assert sum(logged.values()) == pytest.approx(m["time/wall_s"], rel=1e-6)
    # everything but what follows the run's end: the tracker's end, Optuna's last writes, teardown
    assert a["device_s"] - split["teardown"] - 0.5 < m["time/wall_s"] <= a["device_s"]
    assert logged["train"] + logged["sync"] == pytest.approx(a["train_s"]) and logged["setup"] > 0
    lines = (tmp_path / "runs" / "t" / "trial-0" / "metrics.jsonl").read_text().splitlines()
    at = [(k, line["step"]) for line in map(json.loads, lines) for k in line["metrics"]]
    assert len(at) == len(set(at))                                  # each metric once a step

    ck = checkpoint.latest(tmp_path / "runs" / "t" / "trial-0")     # weights and state, no AdamW state
    assert ck is not None and (ck / "model.safetensors").exists() and not list(ck.glob("optimizer.*"))


def test_the_summary_splits_the_device_time_by_phase():
    from search.report import device_shares, summary
    study = optuna.create_study()
    phases = {"setup": 1.0, "compile": 2.0, "train": 25.0, "sync": 5.0, "eval": 3.0, "log": 0.1,
              "checkpoint": 1.5, "track": 2.0, "study": 0.4, "teardown": 0.1, "other": 0.1}
    for attrs in ({"time": phases, "device_s": 40.2, "train_s": 30.0},
                  {"train_s": 5.0, "compile_s": 1.0, "eval_s": 1.0, "device_s": 9.8}):  # before phases
        t = study.ask()
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, 1.0)
    s = device_shares(study, 50.0)
    assert s["train"] == pytest.approx(60) and s["sync"] == pytest.approx(10)
    assert s["checkpoint"] == pytest.approx(3)
    assert s["compile"] == pytest.approx(6) and s["track"] == pytest.approx(4)
    assert s["other"] == pytest.approx(100 * (0.1 + 2.8) / 50)   # the old trial's unnamed rest
    assert sum(s.values()) == pytest.approx(100)
    text = summary(StudyConfig(files=[GPT2], study="s", storage="sqlite://", budget_s=60), study)
    assert "70% of it in training steps, 10% waiting for queued steps at log points (evaluation " \
           "8%, compile 6%, other 6%, tracking 4%, " \
           "checkpoints 3%, set-up 2%, Optuna 1%)" in text
