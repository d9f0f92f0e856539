"""Checkpoints are atomic, hold tensors only, and restore a run exactly."""
from __future__ import annotations

import os

import pytest
import torch

import graphs
from search import checkpoint

from conftest import ROOT


def tiny():
    plan = graphs.elaborate(graphs.load(ROOT / "graphs" / "llama.yaml", size="tiny").resolve())
    model = graphs.build(plan, seed=0)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    return model, opt


def step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50257, (2, 64), generator=g)
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_round_trip_restores_weights_optimizer_and_continues_identically(tmp_path):
    model, opt = tiny()
    step(model, opt, 0)
    path = checkpoint.save(tmp_path, model, opt, {"step": 1, "loader": {"pos": 3}})
    assert checkpoint.latest(tmp_path) == path
    a = [step(model, opt, s) for s in (1, 2)]
    model2, opt2 = tiny()
    state = checkpoint.load(path, model2, opt2)
    assert state["loader"] == {"pos": 3}
    assert model2.head.weight is model2.tok.weight  # tying survives loading
    b = [step(model2, opt2, s) for s in (1, 2)]
    assert a == b


def test_a_crash_during_a_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = tiny()
    first = checkpoint.save(tmp_path, model, opt, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, model, opt, {"step": 2})
    assert checkpoint.latest(tmp_path) == first
    assert not list(tmp_path.glob(".step_*")) and not (tmp_path / "step_000000002").exists()


def test_only_the_last_two_are_kept(tmp_path):
    model, opt = tiny()
    for s in range(1, 5):
        checkpoint.save(tmp_path, model, opt, {"step": s})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000003", "step_000000004"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_checkpoints_are_rejected_with_a_clear_error(tmp_path, damage):
    model, opt = tiny()
    path = checkpoint.save(tmp_path, model, opt, {"step": 1})
    f = path / "model.safetensors"
    if damage == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(1000))
    else:
        f.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load(path, *tiny())
