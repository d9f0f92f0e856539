"""Wiring blocks: residual add, dropout and a plain linear projection."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from blocks.common import fill_, normal_
from blocks.kinds import KindError, hidden
from blocks.registry import Block, param, register


@register
class Add(Block):
    """Elementwise sum of two or more inputs of the same kind (a residual connection)."""

    type_name, family = "add", "basic"
    example = ({}, [hidden(16), hidden(16)])  # for the registry's smoke test
    inputs = ("*xs",)

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        if len(ins) < 2:
            raise KindError(f"takes 2 or more inputs, got {len(ins)}")
        for i, k in enumerate(ins[1:], start=1):
            if k != ins[0]:
                raise KindError(f"all inputs must have one kind: input 1 is {ins[0]}, "
                                f"input {i + 1} is {k}", i)
        if ins[0].name not in ("hidden", "streams"):
            raise KindError(f"adds residual streams, got {ins[0]}", 0)
        return (ins[0],)

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


@register
class Dropout(Block):
    """Zeroes a share p of the values while training (scaled by 1/(1-p))."""

    type_name, family = "dropout", "basic"
    example = ({"p": 0.1}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        p: float = param(0.0, "drop probability", min=0.0, max=1.0)

    @classmethod
    def infer(cls, cfg, ins):
        if len(ins) != 1:
            raise KindError(f"takes 1 input, got {len(ins)}")
        return (ins[0],)

    def forward(self, x):
        return F.dropout(x, self.cfg.p, self.training) if self.cfg.p else x


@register
class Linear(Block):
    """A learned projection of the last dimension: width d_in -> dim (e.g. between widths)."""

    type_name, family = "linear", "basic"
    example = ({"dim": 24}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        dim: int = param(doc="output width", min=1, max=1 << 20)
        bias: bool = param(False, "an additive bias")
        std: float = param(0.02, "init: N(0, std)", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        if len(ins) != 1 or ins[0].name != "hidden":
            raise KindError(f"takes 1 hidden input, got {', '.join(map(str, ins)) or 'none'}", 0)
        return (ins[0].with_(width=cfg.dim),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.proj = nn.Linear(ins[0].width, cfg.dim, bias=cfg.bias)

    def init_weights(self, gen):
        normal_(self.proj.weight, self.cfg.std, gen)
        fill_(self.proj.bias, 0.0)

    def forward(self, x):
        return self.proj(x)
