"""Wiring blocks: residual add and dropout."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from blocks.kinds import KindError
from blocks.registry import Block, param, register


@register
class Add(Block):
    """Elementwise sum of two or more inputs of the same kind (a residual connection)."""

    type_name, family = "add", "basic"
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
