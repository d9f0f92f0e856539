"""Differential attention (Differential Transformer, arXiv 2410.05258).

Each of `heads` differential heads has two query/key heads of width head_dim and one value head
of width 2 * head_dim. Its output is (A1 - lambda * A2) V with Ai = softmax(Qi Ki^T / sqrt(d_h)),
computed as A1 V - lambda * A2 V (two attention calls, so SDPA and its kernels apply), then a
per-head RMSNorm over 2 * head_dim (eps 1e-5, learned gain) times (1 - lambda_init).
lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, the four vectors initialised N(0, 0.1);
lambda_init = 0.8 - 0.6 * exp(-0.3 * layer) with the 0-based layer index, as the paper's code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from blocks.attention import apply_rope, rope_tables
from blocks.attention_ops import Scores, attend
from blocks.common import fill_, normal_, same_hidden
from blocks.kinds import KindError, hidden
from blocks.twins import rms_norm
from blocks.registry import Block, param, register


def lambda_init_for(layer: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


@register
class DiffAttention(Block):
    """Differential causal self-attention: the difference of two softmax maps cancels noise."""

    type_name, family = "diff_attention", "attention_diff"
    example = ({"heads": 2, "rope": True}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        heads: int = param(doc="differential heads (each: 2 query/key heads, one 2x-wide value "
                           "head); the paper halves a Transformer's head count", min=1, max=4096)
        head_dim: int | None = param(None, "width of a query/key head (default: d / (2 * heads))",
                                     min=1, max=4096)
        rope: bool = param(True, "rotary position embedding on q and k")
        rope_theta: float = param(10000.0, "RoPE base", min=1.0, max=1e9)
        window: int | None = param(None, "sliding window (null: full causal)", min=1, max=1 << 24)
        lambda_init: float | None = param(None, "lambda_init (default 0.8 - 0.6 exp(-0.3 layer))",
                                          min=-10.0, max=10.0)
        std: float = param(0.02, "init of the q/k/v projection: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        (k,) = same_hidden(ins, allow_streams=False)
        if cfg.head_dim is None and k.width % (2 * cfg.heads):
            raise KindError(f"width d={k.width} is not divisible by 2 * heads={2 * cfg.heads}; "
                            "set head_dim", 0)
        if cfg.rope and (cfg.head_dim or k.width // (2 * cfg.heads)) % 2:
            raise KindError("RoPE needs an even head_dim", 0)
        return (k,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.h = cfg.heads
        self.dh = cfg.head_dim or d // (2 * cfg.heads)
        self.qkv = nn.Linear(d, 6 * self.h * self.dh, bias=False)  # q: 2h heads, k: 2h, v: h of 2dh
        self.proj = nn.Linear(2 * self.h * self.dh, d, bias=False)
        self.lambdas = nn.Parameter(torch.empty(4, self.dh))         # rows: q1, k1, q2, k2
        self.subln = nn.Parameter(torch.ones(2 * self.dh))
        self.lambda_init = (cfg.lambda_init if cfg.lambda_init is not None
                            else lambda_init_for(ctx.layer or 0))
        if cfg.rope:
            cos, sin = rope_tables(ctx.seq_len, self.dh, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, gen):
        normal_(self.qkv.weight, self.cfg.std, gen)
        normal_(self.proj.weight, self.cfg.proj_std, gen)
        normal_(self.lambdas, 0.1, gen)
        fill_(self.subln, 1.0)

    def lam(self) -> torch.Tensor:
        lq1, lk1, lq2, lk2 = self.lambdas.float()
        return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([2 * self.h * self.dh] * 3, dim=-1)
        q = q.view(b, t, 2 * self.h, self.dh).transpose(1, 2)   # heads (2i, 2i+1) pair up
        k = k.view(b, t, 2 * self.h, self.dh).transpose(1, 2)
        v = v.view(b, t, self.h, 2 * self.dh).transpose(1, 2)
        if self.cfg.rope:
            cos, sin = self.rope_cos[:t].to(q.dtype), self.rope_sin[:t].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        s = Scores(window=self.cfg.window, scale=self.dh ** -0.5)
        a1 = attend(q[:, 0::2], k[:, 0::2], v, s)
        a2 = attend(q[:, 1::2], k[:, 1::2], v, s)
        y = a1 - self.lam().to(a1.dtype) * a2
        y = rms_norm(y, self.subln, 1e-5) * (1.0 - self.lambda_init)
        return self.proj(y.transpose(1, 2).reshape(b, t, 2 * self.h * self.dh))
