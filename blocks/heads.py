"""Output side: the LM head (optionally tied to an embedding), a final-logit softcap, the
cross-entropy loss, and the fused linear cross-entropy (head and loss without full logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.common import fill_, normal_
from blocks.kinds import LOSS, KindError, expect, expect_count, hidden, logits, tokens
from blocks.liger import IMPL_DOC, IMPLS, run
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

    def logit_weight(self) -> torch.Tensor:
        """The [vocab, width] matrix the logits are x @ W.T of."""
        return self.weight

    def init_weights(self, gen):
        if not self.cfg.tie:
            normal_(self.weight, self.cfg.std, gen)
        fill_(self.bias, 0.0)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@register
class LogitSoftcap(Block):
    """Final-logit softcap c * tanh(logits / c) (Gemma 2: c = 30; the speedrun: 30, later 15)."""

    type_name, family = "logit_softcap", "heads"
    example = ({"cap": 30.0}, [logits(50)])  # for the registry's smoke test
    inputs = ("logits",)

    @dataclass(frozen=True)
    class Config:
        cap: float = param(30.0, "the cap c: outputs lie in (-c, c)", min=1e-3, max=1e6)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        return (expect(ins, 0, "logits"),)

    def forward(self, lg):
        return self.cfg.cap * torch.tanh(lg / self.cfg.cap)


@register
class CrossEntropy(Block):
    """Mean next-token cross-entropy in fp32; targets equal to `ignore_index` are skipped."""

    type_name, family = "cross_entropy", "heads"
    example = ({}, [logits(50), tokens(50)])  # for the registry's smoke test
    inputs = ("logits", "targets")

    @dataclass(frozen=True)
    class Config:
        ignore_index: int = param(-1, "target id that contributes no loss", min=-(1 << 31), max=1 << 31)
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        lg = expect(ins, 0, "logits")
        _targets(ins, lg.seq)
        return (LOSS,)

    def forward(self, lg, targets):
        # the twin computes in fp32 at least (fp64 in parity tests)
        return run("cross_entropy", self.cfg.impl, lg.reshape(-1, lg.shape[-1]), targets.reshape(-1),
                   self.cfg.ignore_index)


def _targets(ins, seq):
    tg = ins[1]
    if tg.name not in ("tokens", "bytes") or tg.seq != seq:
        raise KindError(f"input 2 must be target ids on the {seq} sequence, got {tg}", 1)


@register
class LinearCrossEntropy(LMHead):
    """LM head and cross-entropy in one, never holding the full logits (Liger's fused kernel, or
    a chunked twin that computes the gradients in the forward); `tie` shares an embedding's
    table as with lm_head, or names the graph's LM head (lm_head, ngpt_head) to compute exactly
    its logits' loss."""

    type_name, family = "linear_cross_entropy", "heads"
    example = ({"vocab": 50}, [hidden(16), tokens(50)])  # for the registry's smoke test
    inputs = ("x", "targets")

    @dataclass(frozen=True)
    class Config:
        vocab: int = param(doc="number of classes (rows of the weight)", min=1, max=1 << 24)
        tie: str | None = param(None, "id of an embedding or LM head node whose weight is shared", ref=True)
        std: float = param(0.02, "init: N(0, std) (ignored when tied)", min=0.0, max=10.0)
        ignore_index: int = param(-1, "target id that contributes no loss", min=-(1 << 31), max=1 << 31)
        chunk: int = param(4096, "rows per chunk in the twin (its logits: chunk x vocab fp32)", min=1, max=1 << 24)
        impl: str = param("torch", IMPL_DOC + "; liger runs outside compiled regions",
                          choices=IMPLS)
        bias = False   # not a field: Liger's fused loss and our twin take no output bias

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        k = expect(ins, 0, "hidden")
        _targets(ins, k.seq)
        return (LOSS,)

    def bind(self, name, other):
        super().bind(name, other)
        # the weight stays the tied node's alone (no second state_dict key), and the loss uses the
        # matrix that node multiplies by: an LM head's (itself tied or not), nGPT's table times s_z
        del self.weight
        self._tied = (other,)   # a tuple: not registered as a submodule

    def logit_weight(self) -> torch.Tensor:
        if not self.cfg.tie:
            return self.weight
        other = self._tied[0]
        return other.logit_weight() if hasattr(other, "logit_weight") else other.weight

    def forward(self, x, targets):
        return run("linear_cross_entropy", self.cfg.impl, x.reshape(-1, x.shape[-1]), self.logit_weight(),
                   targets.reshape(-1), self.cfg.ignore_index, self.cfg.chunk)
