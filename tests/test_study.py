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
