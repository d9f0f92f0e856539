"""Output side: the LM head (optionally tied to an embedding) and the cross-entropy loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.common import fill_, normal_
from blocks.kinds import LOSS, KindError, expect, expect_count, hidden, logits, tokens
from blocks.registry import Block, param, register


@register
class LMHead(Block):
    """hidden -> logits over `vocab`; with `tie`, reuses that embedding's table as its weight."""

    type_name, family = "lm_head", "heads"
    example = ({"vocab": 50}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        vocab: int = param(doc="number of logits", min=1, max=1 << 24)
        tie: str | None = param(None, "id of an embedding node whose table is shared", ref=True)
        bias: bool = param(False, "an output bias")
        std: float = param(0.02, "init: N(0, std) (ignored when tied)", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "hidden")
        return (logits(cfg.vocab, k.seq),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.width = ins[0].width
        self.weight = None if cfg.tie else nn.Parameter(torch.empty(cfg.vocab, self.width))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab)) if cfg.bias else None

    def bind(self, name, other):
        w = getattr(other, "weight", None)
        if not isinstance(w, nn.Parameter) or tuple(w.shape) != (self.cfg.vocab, self.width):
            shape = tuple(w.shape) if w is not None else None
            raise KindError(f"tie target '{other.ctx.node}' must hold a table of shape "
                            f"({self.cfg.vocab}, {self.width}), it has {shape}")
        self.weight = w

    def init_weights(self, gen):
        if not self.cfg.tie:
            normal_(self.weight, self.cfg.std, gen)
        fill_(self.bias, 0.0)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@register
class CrossEntropy(Block):
    """Mean next-token cross-entropy in fp32; targets equal to `ignore_index` are skipped."""

    type_name, family = "cross_entropy", "heads"
    example = ({}, [logits(50), tokens(50)])  # for the registry's smoke test
    inputs = ("logits", "targets")

    @dataclass(frozen=True)
    class Config:
        ignore_index: int = param(-1, "target id that contributes no loss", min=-(1 << 31), max=1 << 31)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        lg = expect(ins, 0, "logits")
        tg = ins[1]
        if tg.name not in ("tokens", "bytes") or tg.seq != lg.seq:
            raise KindError(f"input 2 must be target ids on the {lg.seq} sequence, got {tg}", 1)
        return (LOSS,)

    def forward(self, lg, targets):
        lg = lg if lg.dtype == torch.float64 else lg.float()   # fp32 at least (fp64 in parity tests)
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1),
                               ignore_index=self.cfg.ignore_index)
