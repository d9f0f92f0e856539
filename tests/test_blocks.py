"""Registry-generated smoke test: every block builds from its declared example, infers the kinds
its module really produces, trains (backward gives finite gradients) and builds on meta."""
from __future__ import annotations

import pytest
import torch

import blocks
from blocks.kinds import Kind
from blocks.registry import Context, config_fields
from graphs.errors import Locator
from graphs.values import make_config

B, T = 2, 8


def sample(kind: Kind) -> torch.Tensor:
    if kind.name in ("tokens", "bytes"):
        return torch.randint(0, kind.vocab, (B, T))
    if kind.name == "hidden":
        return torch.randn(B, T, kind.width, requires_grad=True)
    if kind.name == "streams":
        return torch.randn(B, T, kind.n, kind.width, requires_grad=True)
    if kind.name == "patch_map":
        return (torch.arange(T) // 3).expand(B, T)
    if kind.name == "logits":
        return torch.randn(B, T, kind.vocab, requires_grad=True)
    raise AssertionError(kind)


def check_shape(kind: Kind, t: torch.Tensor) -> None:
    if kind.name == "hidden":
        assert t.shape[0] == B and t.shape[-1] == kind.width and t.dim() == 3
    elif kind.name == "streams":
        assert t.shape[-2:] == (kind.n, kind.width) and t.dim() == 4
    elif kind.name == "logits":
        assert t.shape == (B, T, kind.vocab)
    elif kind.name == "loss":
        assert t.dim() == 0
    elif kind.name == "patch_map":
        assert t.shape == (B, T)


def make(cls, device="cpu"):
    params, ins = cls.example
    cfg = make_config(cls.Config, params, {}, Locator("<example>"), ())
    outs = cls.infer(cfg, ins)
    with torch.device(device):
        mod = cls(cfg, ins, Context(node="x", layer=1, n_layer=2, seq_len=T))
    return mod, ins, outs


@pytest.mark.parametrize("name", sorted(blocks.REGISTRY))
def test_block_smoke(name):
    cls = blocks.REGISTRY[name]
    assert cls.__doc__ and cls.type_name == name
    assert all(f.doc for f in config_fields(cls.Config)), "every parameter needs a doc string"
    mod, ins, outs = make(cls)
    mod.init_weights(torch.Generator().manual_seed(0))
    xs = [sample(k) for k in ins]
    y = mod(*xs)
    ys = y if isinstance(y, tuple) else (y,)
    assert len(ys) == len(outs) == len(cls.outputs)
    for kind, t in zip(outs, ys):
        check_shape(kind, t)
    floats = [t for t in ys if t.is_floating_point()]
    if floats:
        sum(t.float().sum() for t in floats).backward()
        for p in mod.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
    meta, _, _ = make(cls, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_registry_is_closed():
    """A graph can only reach registered classes; names map to Block subclasses only."""
    for name, cls in blocks.REGISTRY.items():
        assert issubclass(cls, blocks.Block)
    with pytest.raises(RuntimeError):
        blocks.register(blocks.REGISTRY["add"])
