"""`python -m search.compare`: an equal-time comparison of gpt2 and llama at `tiny` size with two
seeds, end to end on the CPU (MLflow nesting, the report file), and the verdict rule, the per-graph
--set routing and failure containment in-process."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT
from test_train import env_for

from search import compare
from search.trainer import RunResult

GPT2, LLAMA = str(ROOT / "graphs" / "gpt2.yaml"), str(ROOT / "graphs" / "llama.yaml")


def _graph_row(text: str, name: str) -> list[str]:
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, text
    return [c.strip() for c in rows[0]]


@pytest.mark.slow
def test_two_graphs_two_seeds_equal_time_nested_in_mlflow(tmp_path):
    cmd = [sys.executable, "-m", "search.compare", GPT2, LLAMA, "--size", "tiny", "--seeds", "2",
           "--budget", "2s", "--evals", "1", "--eval-bytes", "4k", "--out", "docs/cmp.md"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, check=False,
                         timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[4/4] llama seed 1: completed" in out.stderr and "ETA" in out.stderr
    text = (tmp_path / "docs" / "cmp.md").read_text()
    assert text.strip() == out.stdout.strip()
    assert "python -m search.compare" in text and "--seeds 2 --budget 2s" in text
    assert re.search(r"device: cpu .*; torch \d", text) and "UTC" in text and "builtin" in text
    for name in ("gpt2", "llama"):
        row = _graph_row(text, name)
        assert row[5].endswith("(2)"), row            # val_bpb mean ± std over n=2 seeds
        assert float(row[5].split("±")[1].split()[0]) > 0, row   # the seeds gave different results
    assert _graph_row(text, "gpt2")[-1] == "reference"
    assert _graph_row(text, "llama")[-1] in ("within noise", "better beyond noise", "worse beyond noise")

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("playground")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "comparison"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 5 and len(children) == 4
    seen = {(r.data.tags["graph"], r.data.tags["seed"]): r.data.metrics["final/val_loss"] for r in children}
    assert set(seen) == {(g, s) for g in ("gpt2", "llama") for s in ("0", "1")}
    assert seen["gpt2", "0"] != seen["gpt2", "1"] and seen["llama", "0"] != seen["llama", "1"]
    assert all(r.data.metrics["final/train_s"] >= 2.0 for r in children)   # the same time for every run


def test_verdict_needs_a_difference_beyond_twice_the_standard_error():
    base = [3.00, 3.01, 2.99]
    assert compare.verdict(base, [2.90, 2.91, 2.89]) == "better beyond noise"
    assert compare.verdict(base, [3.10, 3.11, 3.09]) == "worse beyond noise"
    # difference 0.01, standard error sqrt(2 * 0.01^2 / 3) = 0.0082: within 2 x s.e.
    assert compare.verdict(base, [2.99, 3.00, 2.98]) == "within noise"
    # the same difference is beyond noise when the seeds agree more closely
    assert compare.verdict([3.000, 3.001, 2.999], [2.990, 2.991, 2.989]) == "better beyond noise"
    assert compare.verdict([3.0], [2.0, 2.1]).startswith("not enough seeds")


def test_graph_specific_set_goes_to_that_graph_only():
    sets = compare.graph_sets([GPT2, LLAMA], ["d_model=128", "llama:n_kv_head=2", "n_layer=3"])
    assert sets[GPT2] == ("d_model=128", "n_layer=3")
    assert sets[LLAMA] == ("d_model=128", "n_layer=3", "n_kv_head=2")
    with pytest.raises(ValueError, match="no graph named 'mamba'"):
        compare.graph_sets([GPT2, LLAMA], ["mamba:d_model=1"])


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_comparison_goes_on(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(cfg):
        calls.append((cfg.seed, cfg.graph))
        if len(calls) == 4:  # the report so far is on disk before the last run starts
            assert "3 of 4 runs done" in (tmp_path / "cmp.md").read_text()
        if cfg.graph == LLAMA and cfg.seed == 0:
            raise RuntimeError("CUDA out of memory (injected)")
        if cfg.graph == LLAMA:
            return RunResult("diverged", step=3, tokens=1536, train_s=1.0,
                             message="loss became non-finite at step 2")
        return RunResult("completed", step=5, tokens=2560, train_s=2.0, val_loss=5.0 + cfg.seed,
                         val_bpb=4.0 + cfg.seed)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "run_training", fake)
    rc = compare.main([GPT2, LLAMA, "--size", "tiny", "--seeds", "2", "--tokens", "2048", "--no-track",
                       "--out", "cmp.md"])
    assert rc == 1                                   # not every run completed
    assert calls == [(0, GPT2), (0, LLAMA), (1, GPT2), (1, LLAMA)]   # seed-major
    text = (tmp_path / "cmp.md").read_text()
    assert "| 0 | llama | failed |" in text and "CUDA out of memory (injected)" in text
    assert "| 1 | llama | diverged |" in text and "non-finite at step 2" in text
    assert _graph_row(text, "gpt2")[5] == "4.5000 ± 0.7071 (2)"
    assert _graph_row(text, "gpt2")[2] == "1,024"     # 4 timed steps x 512 tokens in 2 s
    assert _graph_row(text, "llama")[-1] == "no completed runs"
    assert "4 of 4 runs done" in text and "2,048 tokens" in text
    assert capsys.readouterr().out.strip() == text.strip()
