"""Search helpers that need no training: sampling spaces, baselines, --set across families."""
from __future__ import annotations

import optuna
import pytest

import graphs
from search.study import StudyConfig, baseline_params, family_sets, load_families, sample

from conftest import ROOT

GPT2, LLAMA = str(ROOT / "graphs" / "gpt2.yaml"), str(ROOT / "graphs" / "llama.yaml")


def test_a_variable_set_goes_only_to_the_families_that_have_it():
    sets = family_sets([GPT2, LLAMA], ["n_kv_head=4", "d_model=384", "training.lr=1e-3", "nope=1"])
    assert sets[GPT2] == ("d_model=384", "training.lr=1e-3", "nope=1")
    assert sets[LLAMA] == ("n_kv_head=4", "d_model=384", "training.lr=1e-3", "nope=1")
    cfg = StudyConfig(files=[GPT2, LLAMA], study="s", storage="sqlite://", sets=("n_kv_head=4",))
    fams = load_families(cfg)
    assert "vars.n_kv_head" not in {d.name for d in fams["llama"].space()}
    with pytest.raises(graphs.GraphError, match="'nope' is not a variable"):
        load_families(StudyConfig(files=[GPT2, LLAMA], study="s", storage="sqlite://", sets=("nope=1",)))


def test_sampling_follows_the_family_and_baselines_are_the_defaults():
    cfg = StudyConfig(files=[GPT2, LLAMA], study="s", storage="sqlite://", size="tiny")
    fams = load_families(cfg)
    study = optuna.create_study()
    seen = set()
    for _ in range(12):
        t = study.ask()
        fam, params = sample(t, fams)
        seen.add(fam)
        assert set(params) == {d.name for d in fams[fam].space()}
        assert all(k == "graph" or k.startswith(fam + ":") for k in t.params)
        study.tell(t, 1.0)
    assert seen == {"gpt2", "llama"}
    base = baseline_params(fams)
    assert {b["graph"] for b in base} == {"gpt2", "llama"}
    assert {"gpt2:vars.lr": 6e-3, "gpt2:nodes.h.body.mlp.act": "gelu_tanh"}.items() <= base[0].items()


def test_device_time_is_split_into_training_compile_evaluation_and_the_rest():
    from search.report import device_shares
    study = optuna.create_study()
    for attrs in ({"train_s": 30.0, "compile_s": 5.0, "eval_s": 3.0, "device_s": 40.0},
                  {"train_s": 10.0, "compile_s": 1.0, "eval_s": 1.0, "device_s": 20.0},
                  {"device_s": 0.5}):  # refused in pre-flight: all of it overhead
        t = study.ask()
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, 1.0)
    s = device_shares(study, 60.5)
    assert s["train"] == pytest.approx(100 * 40 / 60.5)
    assert s["compile"] == pytest.approx(100 * 6 / 60.5) and s["eval"] == pytest.approx(100 * 4 / 60.5)
    assert s["other"] == pytest.approx(100 * 10.5 / 60.5)
    assert sum(s.values()) == pytest.approx(100)


def test_a_score_that_rises_again_late_is_called_out_in_the_summary():
    from optuna.distributions import FloatDistribution
    from search.report import late_rises, summary
    study = optuna.create_study()
    curves = {0: {57: 1.605, 113: 1.945, 228: 2.699},   # the GPU study's overfit baseline
              1: {50: 1.90, 100: 1.70, 200: 1.62},      # still improving
              2: {50: 1.50, 100: 1.52, 200: 1.55}}      # flat within 5%: not called out
    for n, curve in curves.items():
        study.add_trial(optuna.trial.create_trial(
            value=list(curve.values())[-1],
            intermediate_values={i + 1: v for i, v in enumerate(curve.values())},  # steps: evaluations
            params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2)},
            user_attrs={"graph": "gpt2", "graph_hash": f"h{n}", "device_s": 10.0, "train_s": 8.0,
                        **{f"tokens_at_eval_{i + 1}": k * 10**6 for i, k in enumerate(curve)}}))
    assert [r[0] for r in late_rises(study)] == [0]
    cfg = StudyConfig(files=[GPT2], study="s", storage="sqlite://")
    text = summary(cfg, study)
    assert "rose again late in 1 of 3 completed trials" in text
    assert "trial 0: 1.6050 at 57.0M tokens, then 2.6990 at 228.0M" in text


def _evaluations(pruner_name, curves: list[list[float]], tokens_per_eval: list[int], evals=3):
    """Trials of different speeds (tokens per evaluation) reporting through the study's own
    callback; returns each trial's (state, evaluations it reached)."""
    import time
    from search.run import pruner
    from search.study import Objective
    cfg = StudyConfig(files=[GPT2], study="s", storage="sqlite://", budget_s=1e9, evals=evals,
                      pruner=pruner_name)
    obj = Objective(cfg, {})
    study = optuna.create_study(pruner=pruner(pruner_name, evals) if isinstance(pruner_name, str)
                                else pruner_name)
    out = []
    for curve, per in zip(curves, tokens_per_eval):
        t = study.ask()
        report = obj._on_eval(t, time.time())
        reached, pruned = 0, False
        for k, v in enumerate(curve, 1):
            reached = k
            if report(k * per, {"val/bpb": v, "val/loss": v}):
                pruned = True
                break
        if pruned:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, curve[-1])
        out.append((study.trials[-1].state.name, reached, study.trials[-1].user_attrs))
    return out


def test_pruners_compare_trials_of_different_speeds_at_the_same_evaluation():
    """Trials train for equal time, so a fast architecture reaches evaluation k with more tokens
    than a slow one. The pruners rank evaluation k against evaluation k: steps are evaluation
    indices. (With tokens as the step the median pruner found nothing at a slow trial's step and
    never pruned, and successive halving stacked all its rungs on the first evaluation.)"""
    curves = [[3.0, 2.5, 2.2], [3.1, 2.6, 2.3], [2.9, 2.4, 2.1], [4.0, 3.5, 3.0]]
    speeds = [1000, 3000, 1700, 2300]
    med = _evaluations("median", curves, speeds)
    assert [(s, n) for s, n, _ in med] == [("COMPLETE", 3)] * 3 + [("PRUNED", 1)]
    assert med[3][2]["prune_reason"] == "pruner: val_bpb 4.0000 at evaluation 1 of 3 (2,300 tokens)"
    assert [med[1][2][f"tokens_at_eval_{k}"] for k in (1, 2, 3)] == [3000, 6000, 9000]

    # successive halving keeps the best third at evaluation 1; the first trial has no rival yet
    sh = _evaluations("sh", [[3.0, 2.5, 2.2], [2.0, 1.9, 1.8], [3.5, 1.0, 0.5], [1.5, 1.4, 1.3]],
                      speeds)
    assert [(s, n) for s, n, _ in sh] == [("COMPLETE", 3), ("COMPLETE", 3), ("PRUNED", 1),
                                          ("COMPLETE", 3)]


def test_the_last_evaluation_never_prunes():
    """A trial that reached its last evaluation has spent its budget: pruning it would save no
    device time and throw its result away."""
    class PrunesFromTheThird(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.last_step >= 3

    three = _evaluations(PrunesFromTheThird(), [[3.0, 2.5, 2.2]], [1000], evals=3)
    four = _evaluations(PrunesFromTheThird(), [[3.0, 2.5, 2.2, 2.0]], [1000], evals=4)
    assert [(s, n) for s, n, _ in three + four] == [("COMPLETE", 3), ("PRUNED", 3)]


def test_trial_bytes_replace_the_trial_time():
    from search.run import parse_args
    cfg = parse_args([GPT2, LLAMA, "--trial-bytes", "20K"])
    assert cfg.trial_bytes == 20_000 and cfg.trial_budget_s is None and cfg.trial_tokens is None
    both = parse_args([GPT2, "--trial-bytes", "20K", "--trial-budget", "30s"])   # whichever ends first
    assert both.trial_bytes == 20_000 and both.trial_budget_s == 30


def test_a_dead_workers_trial_is_failed_when_the_command_ends_and_a_live_ones_is_left(tmp_path):
    """A command re-run right after a kill -9 may end (its budget spent) before the killed trial's
    heartbeat is past the grace period; it waits for that trial and fails it. A trial whose worker
    still beats is another command's, alive: it stays RUNNING and is not waited for."""
    import threading
    import time

    from search.study_store import settle_dead_trials, storage
    cfg = StudyConfig(files=[], study="s", storage=f"sqlite:///{tmp_path}/o.db", heartbeat_s=1)
    study = optuna.create_study(study_name="s", storage=storage(cfg))
    dead, live = study.ask(), study.ask()
    st = study._storage
    st.record_heartbeat(dead._trial_id)            # its worker is killed right after this beat
    alive = threading.Event()

    def beat():
        while not alive.is_set():
            st.record_heartbeat(live._trial_id)
            time.sleep(0.25)
    t = threading.Thread(target=beat)
    t.start()
    try:
        t0 = time.monotonic()
        settle_dead_trials(study)
        waited = time.monotonic() - t0
        states = {tr.number: tr.state.name for tr in study.get_trials()}
        assert states[dead.number] == "FAIL" and states[live.number] == "RUNNING", states
        assert waited < 3 + 2.5 + 1, waited             # its grace period and a late beat, no more
        alive.set()                                     # the other worker dies too
        t.join()
        settle_dead_trials(study)
        assert {tr.number: tr.state.name for tr in study.get_trials()}[live.number] == "FAIL"
    finally:
        alive.set()
        t.join()


def test_a_running_trial_beats_from_its_creation_and_is_settled_even_without_a_beat(tmp_path):
    """A kill -9 between the ask that made a trial RUNNING and the heartbeat thread's first beat
    left a trial without a heartbeat, which Optuna never counts as stale: it stayed RUNNING for
    good (tests/test_crash.py failed so in one CI run). Now a trial beats from the moment it
    runs, asked anew or popped from the queue (the database's clock), and one that still has no
    beat is failed once its start is past the grace period, by the ending command and by a
    worker starting its next trial alike, and retried once; a live worker's trial is not."""
    import time

    from optuna.storages._rdb import models

    from search.study_store import settle_dead_trials, storage
    cfg = StudyConfig(files=[], study="s", storage=f"sqlite:///{tmp_path}/o.db", heartbeat_s=1)
    study = optuna.create_study(study_name="s", storage=storage(cfg))
    backend = study._storage._backend
    study.enqueue_trial({"x": 1.0})
    popped, asked = study.ask(), study.ask()
    beats = backend.heartbeats(study._study_id)
    assert beats[popped._trial_id] is not None and beats[asked._trial_id] is not None, beats

    session = backend.scoped_session()                 # the kill fell before the first beat
    session.query(models.TrialHeartbeatModel).delete()
    session.commit()
    session.close()
    t0 = time.monotonic()
    settle_dead_trials(study)
    waited = time.monotonic() - t0
    states = {tr.number: tr.state.name for tr in study.get_trials()}
    assert states[popped.number] == states[asked.number] == "FAIL", states
    assert list(states.values()).count("WAITING") == 2, states     # their retries
    assert 3 < waited < 3 + 2.5 + 1, waited                         # the grace period, no more

    fresh = study.ask()                              # a live worker's trial, not beaten again yet
    session = backend.scoped_session()
    session.query(models.TrialHeartbeatModel).delete()
    session.commit()
    session.close()
    optuna.storages.fail_stale_trials(study)         # what a worker does before its next trial
    assert study._storage.get_trial(fresh._trial_id).state.name == "RUNNING"
    time.sleep(3.2)
    optuna.storages.fail_stale_trials(study)
    assert study._storage.get_trial(fresh._trial_id).state.name == "FAIL"


def test_a_resumed_study_does_not_draw_its_first_trials_again(tmp_path):
    """Only the command that creates a study seeds its sampler: the same command run again (to
    resume, or in a second shell) drew the very trials the first had drawn, and trained a pruned
    trial's graph a second time (the GPU study of docs/benchmarks.md, run 9)."""
    from search.run import open_study
    cfg = StudyConfig(files=[GPT2, LLAMA], study="r", storage=f"sqlite:///{tmp_path}/o.db", size="tiny")
    fams = load_families(cfg)

    def draw(study, n):
        drawn = []
        for _ in range(n):
            t = study.ask()
            sample(t, fams)
            drawn.append(tuple(sorted(t.params.items())))
            study.tell(t, 1.0)
        return drawn
    first = draw(open_study(cfg, fams), 6)[2:]    # after the two enqueued baselines
    again = draw(open_study(cfg, fams), 4)        # the command run again: the study resumes
    assert not set(first) & set(again)


def test_a_graph_the_pruner_stopped_is_not_trained_again(monkeypatch):
    """A trial that draws the graph of a trial the pruner stopped is pruned at once, with the
    first one's curve (what TPE ranks it by); a graph whose trial the budget cut short, or that
    failed, is trained again."""
    import search.study as study_mod
    from search.study import Objective
    cfg = StudyConfig(files=[GPT2], study="d", storage="sqlite://", size="tiny")
    fams = load_families(cfg)
    study = optuna.create_study()
    trained = []
    monkeypatch.setattr(study_mod, "run_training", lambda run, **kw: trained.append(run) or 1 / 0)

    def earlier(reason: str | None, state) -> dict:
        t = study.ask()
        fam, params = sample(t, fams)
        t.set_user_attr("graph_hash", graphs.elaborate(fams[fam].resolve(params)).hash)
        t.report(2.5, step=1)
        if reason:
            t.set_user_attr("prune_reason", reason)
        study.tell(t, state=state)
        return t.params

    def again(params: dict) -> optuna.trial.FrozenTrial:
        study.enqueue_trial(params)
        study.optimize(Objective(cfg, fams), n_trials=1, catch=(Exception,))
        return study.trials[-1]

    stopped = earlier("pruner: val_bpb 2.5000 at evaluation 1 of 4 (4,096 tokens)",
                      optuna.trial.TrialState.PRUNED)
    t = again(stopped)
    assert t.state.name == "PRUNED" and not trained
    assert t.user_attrs["prune_reason"] == "same graph as trial 0, which the pruner stopped"
    assert t.user_attrs["duplicate_of"] == 0 and t.intermediate_values == {1: 2.5}
    cut = earlier("the study's device-time budget ran out mid-trial", optuna.trial.TrialState.PRUNED)
    assert again(cut).state.name == "FAIL" and len(trained) == 1      # trained (and made to fail here)
    failed = earlier(None, optuna.trial.TrialState.FAIL)
    assert again(failed).state.name == "FAIL" and len(trained) == 2


def test_a_trial_stops_when_other_workers_spend_the_study_budget_between_its_evaluations(
        tmp_path, monkeypatch):
    """Another worker's running trial spends the study's device time too: a trial given what was
    left at its start stops at a log point once the total runs out, not at its next evaluation."""
    import time

    import search.study as study_mod
    from search.study import Objective
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "BUDGET_CHECK_S", 0.5)
    cfg = StudyConfig(files=[GPT2], study="b", storage="sqlite://", size="tiny", budget_s=40.0,
                      trial_budget_s=30.0, evals=1, eval_bytes=2048, pruner="none",
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    fams = load_families(cfg)
    study = optuna.create_study()
    other = study.ask()                              # another worker's trial, running for 20 s
    other.set_user_attr("started", time.time() - 20.0)
    study.optimize(Objective(cfg, fams), n_trials=1)
    t = study.trials[-1]
    assert t.state.name == "PRUNED", t.user_attrs
    assert t.user_attrs["prune_reason"] == "the study's device-time budget ran out mid-trial"
    # 20 s were left and both trials spend them: about 10 s each (set-up and the log interval
    # included), not the 20 s of training it was given at its start (its only evaluation was at
    # the end); the margin is for a loaded machine (a CI run's steps took 0.1 s)
    assert t.user_attrs["train_s"] < 15, t.user_attrs["time"]
