"""`--seeds K` (re-run the top trials and the baseline with new seeds, mean ± spread, verdict) and
`--also` (several objectives, the Pareto front, best.yaml). The report logic is tested on
hand-made studies; three short studies run the real command on the CPU."""
from __future__ import annotations

import re
import statistics

import optuna
import pytest

import graphs
from search import report
from search.run import open_study, parse_args
from search.study import StudyConfig, load_families, sample

from conftest import ROOT
from test_search import search, trials  # the subprocess runner with its own MLflow and Optuna stores

GPT2 = str(ROOT / "graphs" / "gpt2.yaml")
# Equal tokens, not equal time: on a shared CPU a time budget makes the seed spread mostly noise
# from the machine. One evaluation per run, on a small corpus (below) for a short one.
QUICK = [GPT2, "--size", "tiny", "--trial-tokens", "1024", "--evals", "1", "--budget", "10m",
         "--pruner", "none"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """argparse's source as a corpus: its last 2% of lines (about 2 KB) is the validation span,
    which costs a tiny model a second to evaluate where the built-in corpus's first validation
    document (15 KB, 50k-way logits) costs ten."""
    import argparse

    from search.data import prepare
    out = tmp_path_factory.mktemp("data") / "argparse"
    prepare(argparse.__file__, out, "gpt2", val_share=0.02, progress=False)
    return str(out)


def record(results: dict, baselines=("0",)) -> dict:
    return {"objective": "val_bpb", "seeds": [1, 2, 3], "results": results,
            "baselines": list(baselines), "device_s": 1.0}


def test_the_verdict_needs_three_seeds_and_a_gap_beyond_twice_the_standard_error():
    clear = report.seed_report(record({"3": [2.00, 2.01, 2.02], "0": [2.50, 2.51, 2.49]}))
    assert "verdict: trial 3 beats the baseline beyond noise: 2.0100 vs 2.5000" in clear
    assert re.search(r"^\s+0 b\s+2\.5000\s+0\.0100\s+3$", clear, re.MULTILINE)       # mean, sd, n
    noisy = report.seed_report(record({"3": [2.0, 2.4, 2.2], "0": [2.3, 2.1, 2.5]}))
    assert "trial 3 does not beat the baseline" in noisy
    few = report.seed_report(record({"3": [2.0, 2.01], "0": [2.5, 2.51]}))
    assert "not enough seeds to judge" in few
    assert "no trial beats the baseline" in report.seed_report(record({"3": [2.6] * 3, "0": [2.5] * 3}))
    failed = report.seed_report(record({"3": [2.0, 2.1, 2.2], "0": []}))
    assert "every seed failed" in failed and "verdict: no baseline result" in failed


def _tiny_study(cfg: StudyConfig, values: list, directions=("minimize",), repeats: int = 0):
    """An in-memory study of gpt2-tiny trials with the given values; the first is the baseline
    and the last repeats trial `repeats`'s graph, as a duplicate trial does."""
    fams = load_families(cfg)
    study = optuna.create_study(directions=list(directions))
    for i, v in enumerate(values):
        if i == len(values) - 1:
            study.enqueue_trial(study.trials[repeats].params)
        t = study.ask()
        fam, params = sample(t, fams)
        t.set_user_attr("graph", fam)
        t.set_user_attr("graph_hash", graphs.elaborate(fams[fam].resolve(params)).hash)
        t.set_user_attr("baseline", i == 0)
        study.tell(t, v)
    return study


def test_a_tied_best_still_gives_one_best_yaml(tmp_path, monkeypatch):
    # Optuna 5's best_trials is the Pareto front even with one objective: a duplicate of the best
    # trial ties with it, and best.yaml used to be replaced by best-0.yaml and best-1.yaml.
    cfg = StudyConfig(files=[GPT2], study="tie", storage="sqlite://", size="tiny")
    study = _tiny_study(cfg, [1.0, 2.0, 1.0])
    assert len(study.best_trials) == 2
    monkeypatch.chdir(tmp_path)
    report.finish(cfg, study)
    out = sorted(p.name for p in (tmp_path / "studies" / "tie").iterdir())
    assert out == ["best.yaml", "summary.txt"]
    assert "trial 0," in (tmp_path / "studies" / "tie" / "best.yaml").read_text()


def test_seeds_go_to_the_best_distinct_graphs_and_to_the_baseline_however_it_ranked():
    cfg = StudyConfig(files=[GPT2], study="c", storage="sqlite://", size="tiny")
    study = _tiny_study(cfg, [3.0, 1.0, 2.0, 1.0], repeats=1)
    chosen, base = report._chosen(study, top=2)
    assert [t.number for t in chosen] == [1, 2, 0] and [t.number for t in base] == [0]


def test_the_front_lists_each_graph_once_and_best_yaml_is_its_lowest_first_objective(tmp_path,
                                                                                  monkeypatch):
    cfg = StudyConfig(files=[GPT2], study="mo", storage="sqlite://", size="tiny", also=("params",))
    study = _tiny_study(cfg, [[1.5, 100.0], [1.2, 300.0], [1.4, 400.0], [1.5, 100.0]],
                        directions=("minimize", "minimize"))
    assert [t.number for t in report.front(study)] == [1, 0]      # 2 is dominated, 3 repeats 0
    text = report.summary(cfg, study)
    assert "Pareto front of val_bpb, params (2 graphs); best.yaml is trial 1" in text
    assert re.search(r"^\s+1\s+1\.2000\s+300$", text, re.MULTILINE)
    monkeypatch.chdir(tmp_path)
    report.finish(cfg, study)
    folder = tmp_path / "studies" / "mo"
    assert "trial 1, val_bpb 1.2000, params 300," in (folder / "best.yaml").read_text()
    assert (folder / "front-trial-0.yaml").exists() and not (folder / "front-trial-3.yaml").exists()


def test_a_stored_study_refuses_other_objectives(tmp_path, monkeypatch):
    # Optuna would load the one-objective study and fail every two-valued trial after training it.
    monkeypatch.chdir(tmp_path)
    cfg = parse_args([GPT2, "--size", "tiny", "--study", "o"])
    open_study(cfg, load_families(cfg))
    also = parse_args([GPT2, "--size", "tiny", "--study", "o", "--also", "params"])
    with pytest.raises(ValueError, match="optimises val_bpb, not val_bpb, params"):
        open_study(also, load_families(also))
    open_study(cfg, load_families(cfg))                            # the same objectives resume


def _seed_runs(tmp_path) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("playground").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    return [r for r in runs if r.data.tags.get("kind") == "seed"
            and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.mark.slow
def test_seeds_rerun_the_top_trials_and_the_baseline_with_the_same_new_seeds(tmp_path, small_data):
    out = search(tmp_path, *QUICK, "--data", small_data, "--trials", "2", "--seeds", "2", "--study", "s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    rec = study.user_attrs["seeds"]
    assert rec["baselines"] == ["0"] and set(rec["results"]) == {"0", "1"}
    for n, vals in rec["results"].items():
        assert len(vals) == 2 and vals[0] != vals[1]               # the seed changed the run
        mean = f"{statistics.mean(vals):.4f}"
        sd = f"{statistics.stdev(vals):.4f}"
        mark = " b" if n == "0" else "  "
        assert re.search(rf"^\s+{n}{mark}\s+{mean}\s+{sd}\s+2$", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^verdict: (no trial beats the baseline|trial 1 .* not enough seeds)", out.stdout, re.MULTILINE)
    assert "verdict:" in (tmp_path / "studies" / "s" / "summary.txt").read_text()
    runs = _seed_runs(tmp_path)                                    # tracked as child runs
    seen = {(r.data.tags["optuna.trial"], r.data.tags["seed"]) for r in runs}
    assert seen == {(n, s) for n in ("0", "1") for s in ("1", "2")} and len(runs) == 4
    assert all(r.data.params["run.seed"] == r.data.tags["seed"] for r in runs)


@pytest.mark.slow
def test_also_params_is_a_two_objective_study_with_a_pareto_front(tmp_path, small_data):
    # d_model becomes a marker so that parameter counts differ between trials
    out = search(tmp_path, *QUICK, "--data", small_data, "--trials", "3", "--also", "params", "--study", "p",
                 "--set", "d_model={choice: [32, 64], default: 64}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ts = [t for t in trials(tmp_path, "p") if t.state.name == "COMPLETE"]
    assert len(ts) == 3
    ts = [t for t in ts if "duplicate_of" not in t.user_attrs]   # the table lists a graph once
    for t in ts:
        assert t.values[1] == t.user_attrs["params"]
    front = [t for t in ts if not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1]
                                      and o.values != t.values for o in ts)]
    best = min(front, key=lambda t: (t.values[0], t.number))
    assert f"best.yaml is trial {best.number}, the lowest val_bpb on the front" in out.stdout
    for t in front:
        assert re.search(rf"^\s+{t.number}\s+{t.values[0]:.4f}\s+{t.values[1]:,.0f}$", out.stdout, re.MULTILINE)
    folder = tmp_path / "studies" / "p"
    assert f"trial {best.number}, val_bpb {best.values[0]:.4f}" in (folder / "best.yaml").read_text()
    assert {p.name for p in folder.glob("front-trial-*.yaml")} == \
        {f"front-trial-{t.number}.yaml" for t in front if t is not best}


@pytest.mark.slow
def test_also_tok_s_maximises_throughput_beside_the_loss(tmp_path, small_data):
    out = search(tmp_path, *QUICK, "--data", small_data, "--trials", "2", "--also", "tok_s", "--study", "t")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and all(t.values[1] == t.user_attrs["tok_s"] > 0 for t in done)
    assert "Pareto front of val_bpb, tok_s" in out.stdout
    assert (tmp_path / "studies" / "t" / "best.yaml").exists()
