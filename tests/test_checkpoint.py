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


def test_a_weights_only_checkpoint_exports_but_does_not_resume(tmp_path):
    # a search trial is never resumed (a retry is a new trial): its checkpoint skips the AdamW
    # state, two thirds of the bytes, and a resume from it fails with a clear error
    model, opt = tiny()
    step(model, opt, 0)
    full = checkpoint.save(tmp_path / "full", model, opt, {"step": 1})
    light = checkpoint.save(tmp_path / "light", model, None, {"step": 1})
    assert not list(light.glob("optimizer.*")) and (full / "optimizer.safetensors").exists()
    assert (light / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    size = {p: sum(f.stat().st_size for f in p.iterdir()) for p in (full, light)}
    assert size[light] < 0.4 * size[full]
    model2, opt2 = tiny()
    assert checkpoint.load(light, model2)["weights_only"] is True
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    with pytest.raises(checkpoint.CheckpointError, match="holds the weights only"):
        checkpoint.load(light, model2, opt2)
