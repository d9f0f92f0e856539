"""Normalisation blocks: LayerNorm (GPT-2) and RMSNorm (Llama, computed in fp32 like HF)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks.common import fill_, same_hidden
from blocks.kinds import hidden
from blocks.liger import IMPL_DOC, IMPLS, run
from blocks.registry import Block, param, register


@register
class LayerNorm(Block):
    """Layer normalisation over the last dimension, with learned gain and optional bias."""

    type_name, family = "layernorm", "norms"
    example = ({}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        eps: float = param(1e-5, "added to the variance", min=0.0, max=1.0)
        bias: bool = param(True, "learn an additive bias")
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    @classmethod
    def infer(cls, cfg, ins):
        return same_hidden(ins)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if cfg.bias else None

    def init_weights(self, gen):
        fill_(self.weight, 1.0)
        fill_(self.bias, 0.0)

    def forward(self, x):
        return run("layer_norm", self.cfg.impl, x, self.weight, self.bias, self.cfg.eps)


@register
class RMSNorm(Block):
    """x / rms(x) * gain; the normalisation runs in fp32 and is cast back, as in HF Llama."""

    type_name, family = "rmsnorm", "norms"
    example = ({}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        eps: float = param(1e-6, "added to the mean square", min=0.0, max=1.0)
        gain: bool = param(True, "learn a per-channel gain (initialised to 1)")
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    @classmethod
    def infer(cls, cfg, ins):
        return same_hidden(ins)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.weight = nn.Parameter(torch.ones(ins[0].width)) if cfg.gain else None

    def init_weights(self, gen):
        fill_(self.weight, 1.0)

    def forward(self, x):
        return run("rms_norm", self.cfg.impl, x, self.weight, self.cfg.eps)
