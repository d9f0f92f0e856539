"""Hyper-connections (arXiv 2409.19606), static form: n parallel residual streams.

expand (once, after the embedding) -> per sublayer: read (width connection, h_in = sum_i a_i H_i)
and write (depth + width connection, H'_j = beta_j * y + sum_i A_r[i, j] H_i) -> collapse (once,
before the final norm). Initialised so that the model equals Pre-Norm at step 0. The dynamic,
fractional and manifold-constrained variants build on these kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks.common import fill_
from blocks.kinds import KindError, expect, expect_count, hidden, streams
from blocks.registry import Block, param, register


@register
class HCExpand(Block):
    """hidden -> n identical streams."""

    type_name, family = "hc_expand", "hyper"
    example = ({"n": 3}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        n: int = param(doc="number of parallel residual streams", min=1, max=64)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "hidden")
        return (streams(cfg.n, k.width, k.seq),)

    def forward(self, x):
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.cfg.n, x.shape[-1])


@register
class HCCollapse(Block):
    """n streams -> their sum (a final scale-invariant norm removes the factor n)."""

    type_name, family = "hc_collapse", "hyper"
    example = ({}, [streams(3, 16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "streams")
        return (hidden(k.width, k.seq),)

    def forward(self, h):
        return h.sum(dim=-2)


@register
class HCRead(Block):
    """Width connection: the sublayer input is a learned mix of the streams (A_m)."""

    type_name, family = "hc_read", "hyper"
    example = ({}, [streams(3, 16)])  # for the registry's smoke test
    inputs = ("streams",)

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "streams")
        return (hidden(k.width, k.seq),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.n = ins[0].n
        self.a_m = nn.Parameter(torch.zeros(self.n))

    def init_weights(self, gen):
        if self.a_m.device.type != "meta":
            with torch.no_grad():
                self.a_m.zero_()
                self.a_m[(self.ctx.layer or 0) % self.n] = 1.0  # one-hot on stream layer mod n

    def forward(self, h):
        return torch.einsum("...nd,n->...d", h, self.a_m.to(h.dtype))


@register
class HCWrite(Block):
    """Depth and width connection: H'_j = beta_j * y + sum_i A_r[i, j] * H_i."""

    type_name, family = "hc_write", "hyper"
    example = ({}, [streams(3, 16), hidden(16)])  # for the registry's smoke test
    inputs = ("streams", "y")

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        h = expect(ins, 0, "streams")
        y = expect(ins, 1, "hidden")
        if (y.width, y.seq) != (h.width, h.seq):
            raise KindError(f"the sublayer output {y} does not match the streams {h}", 1)
        return (h,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        n = ins[0].n
        self.beta = nn.Parameter(torch.ones(n))
        self.a_r = nn.Parameter(torch.eye(n))

    def init_weights(self, gen):
        fill_(self.beta, 1.0)
        if self.a_r.device.type != "meta":
            with torch.no_grad():
                self.a_r.copy_(torch.eye(self.a_r.shape[0]))

    def forward(self, h, y):
        mixed = torch.einsum("...id,ij->...jd", h, self.a_r.to(h.dtype))
        return mixed + y.unsqueeze(-2) * self.beta.to(h.dtype)[:, None]
