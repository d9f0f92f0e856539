"""Feed-forward blocks: the GPT-2 MLP (GELU-tanh by default), the SwiGLU MLP (Llama) and GEGLU."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from blocks.common import fill_, normal_, same_hidden
from blocks.kinds import hidden
from blocks.liger import IMPL_DOC, IMPLS, run
from blocks.registry import Block, param, register

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


class _FeedForward(Block):
    """Shared by both MLPs: width in = width out, fc then proj, GPT-2/Llama-style init."""

    @classmethod
    def infer(cls, cfg, ins):
        return same_hidden(ins, allow_streams=False)

    def init_weights(self, gen):
        normal_(self.fc.weight, self.cfg.std, gen)
        normal_(self.proj.weight, self.cfg.proj_std, gen)
        fill_(self.fc.bias, 0.0)
        fill_(self.proj.bias, 0.0)


@register
class MLP(_FeedForward):
    """proj(act(fc(x))): width d -> hidden -> d."""

    type_name, family = "mlp", "mlp"
    example = ({"hidden": 32}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        hidden: int = param(doc="inner width (GPT-2: 4 * d)", min=1, max=1 << 22)
        act: str = param("gelu_tanh", "activation", choices=tuple(ACTIVATIONS))
        bias: bool = param(True, "biases on both projections")
        std: float = param(0.02, "init of fc: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection", min=0.0, max=10.0)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.fc = nn.Linear(d, cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, d, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


@register
class SwiGLU(_FeedForward):
    """proj(silu(gate(x)) * up(x)); gate and up are one fused projection `fc` = [gate; up]."""

    type_name, family = "swiglu", "mlp"
    example = ({"hidden": 32}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        hidden: int = param(doc="inner width (Llama: about 8d/3, rounded up)", min=1, max=1 << 22)
        bias: bool = param(False, "biases on the projections")
        std: float = param(0.02, "init of gate/up: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection", min=0.0, max=10.0)
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    op = "swiglu"   # act(gate) * up, by the twin or the Liger kernel (blocks.liger)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.fc = nn.Linear(d, 2 * cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, d, bias=cfg.bias)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(run(self.op, self.cfg.impl, gate, up))


@register
class GEGLU(SwiGLU):
    """proj(gelu_tanh(gate(x)) * up(x)) (Gemma); fc = [gate; up] as in SwiGLU."""

    type_name, family = "geglu", "mlp"
    op = "geglu"
