"""Initialisation statistics of gpt2.yaml at its default (124M) size (architectures.md §5):
N(0, 0.02) for tables and projections, N(0, 0.02/sqrt(2L)) for the residual output projections,
zero biases, unit norm gains, and an initial loss of about ln V on random tokens.

The loss is not ln V to 0.1 at this width: the tied head makes logits = ln_f(x) . tok, with
variance s^2 = d * 0.02^2 = 0.31, and E[logsumexp] of V such logits is about ln V + s^2 / 2
(10.98 for V = 50304). HF's GPT2LMHeadModel at the same size gives 11.00 as well."""
from __future__ import annotations

import math
import re

import pytest
import torch

import graphs
from conftest import ROOT

REL = 0.02  # the spec's 2% (tighter than needed: a 768x768 sample's std is within ~0.1%)


@pytest.fixture(scope="module")
def gpt2():
    g = graphs.load(ROOT / "graphs" / "gpt2.yaml").resolve({})  # default size and choices: 124M, gelu_tanh
    return g.data["vars"], graphs.build(graphs.elaborate(g), device="cpu", seed=0)


def test_gpt2_initial_loss_is_ln_vocab(gpt2):
    vars_, model = gpt2
    ln_v = math.log(vars_["vocab_size"])
    predicted = ln_v + vars_["d_model"] * 0.02**2 / 2
    gen = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, vars_["vocab_size"], (2, 128), generator=gen) for _ in "it")
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - predicted) < 0.1, (loss.item(), predicted)
    assert 0.0 < loss.item() - ln_v < 0.25, (loss.item(), ln_v)


def test_gpt2_init_std(gpt2):
    vars_, model = gpt2
    n_layer = vars_["n_layer"]
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    seen = {"proj": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.ndim == 1:  # norm gains start at 1, biases at 0
            assert torch.all(p == (1.0 if re.search(r"ln_\w+\.weight$", name) else 0.0)), name
            continue
        is_proj = bool(re.fullmatch(r"h\.\d+\.(attn|mlp)\.proj\.weight", name))
        want = proj_std if is_proj else 0.02
        seen["proj" if is_proj else "other"] += 1
        std = p.std().item()
        assert abs(std - want) <= REL * want, (name, std, want)
        assert abs(p.mean().item()) < 0.05 * want, name
    # tok, pos, then per layer attn.qkv and mlp.fc; the tied head shares tok's table
    assert seen == {"proj": 2 * n_layer, "other": 2 + 2 * n_layer}, seen
    assert model.head.weight is model.tok.weight
