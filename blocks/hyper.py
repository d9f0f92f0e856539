"""Hyper-connections (arXiv 2409.19606): a residual of n parallel streams, in static (SHC),
dynamic (DHC) and manifold-constrained (mHC, arXiv 2512.24880) form, with frac-connections
(arXiv 2503.14125: split the width into m fractions instead of copying it).

hc_expand (once, after the embedding) -> per sublayer: hc_read (width connection: the
sublayer's input is a mix of the streams) and hc_write (depth + width connection:
H'_t = sum_u A_r[u, t] H_u + sum_f B[f, t] y_f) -> hc_collapse (once, before the final norm).
Read and write each compute their dynamic coefficients from the same streams H (normed), which
is the paper's single HC split in two; the norm has no gain because the projection after it
would absorb one. Initialised so that the model equals Pre-Norm at step 0. Math: hyper_ops.py;
`impl` runs mode mhc through Liger's fused mHC kernels instead (blocks/liger.py), and static
and dynamic connections through our fused Triton kernels (impl triton, blocks/hyper_kernels.py).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

from blocks import hyper_ops as ops
from blocks import liger
from blocks.kinds import KindError, expect, expect_count, hidden, streams
from blocks.registry import Block, param, register

MODES = ("static", "dynamic", "mhc")
# mHC's static logits at init (ours; the paper does not fix them). The streams start equal, so
# any choice gives exactly Pre-Norm at init. sigmoid(+-2) = 0.88 / 0.12 makes the pre gate
# nearly one-hot on stream k, breaking the symmetry between streams as HC's one-hot A_m does.
# The residual logits are I (diagonal 0.48 at n = 4), not a near-identity: Sinkhorn-Knopp
# converges at the rate of the second eigenvalue, and near a permutation 20 iterations leave
# row sums ~1e-3 off; from here they reach 1 to fp32 precision (tests/test_hyper.py).
MHC_PRE_LOGIT, MHC_RES_LOGIT = 2.0, 1.0
MAX_FUSED_STREAMS = 16   # impl triton: its kernels (blocks/hyper_triton.py) unroll over the streams
IMPLS = (*liger.IMPLS, "triton")
IMPL_DOC = ("mode mhc's " + liger.IMPL_DOC + "; liger needs a power-of-two number of streams "
            "(static and dynamic have no Liger op: torch or auto); triton: our fused kernels "
            "(blocks/hyper_kernels.py) for static and dynamic connections without frac, CUDA only")


def _streams_in(ins, cfg):
    k = expect(ins, 0, "streams")
    if cfg.mode == "mhc" and (k.frac or 1) > 1:
        raise KindError("mode mhc does not combine with frac-connections (frac > 1)", 0)
    if cfg.impl == "triton" and ((k.frac or 1) > 1 or k.n > MAX_FUSED_STREAMS):
        raise KindError(f"impl triton takes frac 1 and at most {MAX_FUSED_STREAMS} streams, not "
                        f"{k.n // (k.frac or 1)} streams of frac {k.frac or 1}; use impl torch", 0)
    why = liger.mhc_unsupported(k.n) if cfg.mode == "mhc" and cfg.impl == "liger" else None
    if why:
        raise KindError(f"impl liger cannot run this mHC: {why}; use impl torch or auto", 0)
    return k


def _check_impl(cfg):
    if cfg.impl == "liger" and cfg.mode != "mhc":
        return (f"impl liger: Liger has a fused op for mode mhc only, not {cfg.mode}; "
                "use impl torch, auto or triton")
    if cfg.impl == "triton" and cfg.mode == "mhc":
        return "impl triton: our fused kernels cover static and dynamic only; mhc has impl liger"
    return None


class _Model(Block):
    """Expand and collapse stand outside repeat groups (graphs/elaborate.py checks
    `model_level`): per-block expand/collapse silently gives n independent plain residuals."""

    model_level = True

    def no_decay(self):
        return set()


@register
class HCExpand(_Model):
    """hidden -> n streams: n copies of the embedding (each split into `frac` fractions)."""

    type_name, family = "hc_expand", "hyper"
    example = ({"n": 3, "frac": 2}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        n: int = param(doc="number of parallel residual streams (expansion rate)", min=1, max=64)
        frac: int = param(1, "frac-connections: split every stream's width into this many "
                             "fractions (1: plain hyper-connections)", min=1, max=64)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "hidden")
        if k.width % cfg.frac:
            raise KindError(f"width {k.width} is not divisible by frac {cfg.frac}", 0)
        return (streams(cfg.n * cfg.frac, k.width // cfg.frac, k.seq, cfg.frac),)

    def forward(self, x):
        # contiguous, not a stride-0 view: every layer then sees the same strides, so a
        # regionally compiled layer is not compiled again for layer 0's input
        return ops.expand(x, self.cfg.n, self.cfg.frac).contiguous()


@register
class HCCollapse(_Model):
    """n streams -> their sum (a final scale-invariant norm removes the factor n)."""

    type_name, family = "hc_collapse", "hyper"
    example = ({}, [streams(6, 8, frac=2)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = expect(ins, 0, "streams")
        return (hidden(k.width * (k.frac or 1), k.seq),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.m = ins[0].frac or 1

    def forward(self, h):
        return ops.collapse(h, self.m)


class _Connection(Block):
    """Shared by read and write: the streams' layout and the shape check between blocks."""

    family = "hyper"

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        k = ins[0]
        self.u, self.w, self.m = k.n, k.width, k.frac or 1   # pieces, piece width, fractions
        self.n = self.u // self.m                             # streams

    def _check(self, h):
        if tuple(h.shape[-2:]) != (self.u, self.w):
            raise ValueError(f"{self.type_name} '{self.ctx.node}': streams of shape "
                             f"{tuple(h.shape)}, expected (..., {self.u}, {self.w})")

    def _run_mhc(self, op, h, *args):
        """op of blocks/liger.py by `impl`; where Liger cannot take these streams, liger refuses
        (naming this node) and auto runs the twin."""
        impl = self.cfg.impl
        why = None if h.device.type == "meta" else liger.mhc_unsupported(self.u, h.dtype)
        if why and impl == "liger":
            raise RuntimeError(f"{self.type_name} '{self.ctx.node}': impl liger: {why}")
        return liger.run(op, "torch" if why else impl, h, *args)

    def _fused(self, h, *more):
        """blocks/hyper_kernels.py, where impl triton asks for it and can run; None on the meta
        device (shapes only: the twin has the same) and for every other impl. `more`: the other
        inputs, whose dtypes are checked with h's."""
        if self.cfg.impl != "triton" or h.device.type == "meta":
            return None
        where = f"{self.type_name} '{self.ctx.node}': impl triton"
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError(f"{where} needs the triton package (CUDA builds of torch bring it)")
        if h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{where} needs a CUDA device, not {h.device.type} (or "
                               "TRITON_INTERPRET=1: Triton's CPU interpreter, for tests)")
        if torch.float64 in (h.dtype, *(t.dtype for t in more), next(self.parameters()).dtype):
            raise RuntimeError(f"{where} computes in fp32; use impl torch for float64")
        from blocks import hyper_kernels
        return hyper_kernels

    def no_decay(self):
        # decay would pull A_r and the one-hot A_m towards 0, away from the residual
        return {n for n, _ in self.named_parameters()}

    def _scale(self):
        return nn.Parameter(torch.tensor(float(self.cfg.scale_init)))

    def _fill(self, t, value):
        if t.device.type != "meta":
            with torch.no_grad():
                t.copy_(value if torch.is_tensor(value) else torch.full_like(t, value))


@register
class HCRead(_Connection):
    """Width connection: the sublayer input is a mix of the streams, h_in = A_m^T H. Its second
    output, `streams`, is H itself, for the write of the same sublayer: with impl triton, H's
    gradient from the write then reaches this node's backward kernel, which adds it (see
    hyper_kernels._Read); for the other impls it is the same tensor."""

    type_name = "hc_read"
    example = ({"mode": "dynamic"}, [streams(6, 8, frac=2)])  # for the registry's smoke test
    inputs = ("streams",)
    outputs = ("out", "streams")

    @dataclass(frozen=True)
    class Config:
        mode: str = param("static", "static (SHC), dynamic (DHC: tanh of the normed streams) or "
                                    "mhc (sigmoid gates of the normed flattened streams)",
                          choices=MODES)
        index: int | None = param(None, "sublayer index k: A_m starts one-hot on stream k mod n "
                                        "(default: the layer index)", min=0, max=1_000_000)
        scale_init: float = param(0.01, "initial scale s_alpha of the dynamic part", min=0.0, max=10.0)
        eps: float = param(1e-6, "eps of the norm the dynamic part reads", min=0.0, max=1.0)
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    @classmethod
    def check_config(cls, cfg):
        return _check_impl(cfg)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        k = _streams_in(ins, cfg)
        return hidden(k.width * (k.frac or 1), k.seq), k

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        u, w, m = self.u, self.w, self.m
        if cfg.mode == "mhc":
            self.pre_bias = nn.Parameter(torch.zeros(u))
            self.pre_proj = nn.Parameter(torch.zeros(u * w, u))
            self.pre_scale = self._scale()
        else:
            self.a_m = nn.Parameter(torch.zeros(u, m))
            if cfg.mode == "dynamic":
                self.w_m = nn.Parameter(torch.zeros(w, m))
                self.s_alpha = self._scale()

    def _stream(self) -> int:
        k = self.cfg.index if self.cfg.index is not None else (self.ctx.layer or 0)
        return k % self.n

    def init_weights(self, gen):
        k = self._stream()
        if self.cfg.mode == "mhc":
            logits = torch.full((self.u,), -MHC_PRE_LOGIT)
            logits[k] = MHC_PRE_LOGIT
            self._fill(self.pre_bias, logits)
            self._fill(self.pre_proj, 0.0)
            self._fill(self.pre_scale, self.cfg.scale_init)
            return
        a = torch.zeros(self.u, self.m)
        a[k * self.m + torch.arange(self.m), torch.arange(self.m)] = 1.0  # stream k, fraction f -> f
        self._fill(self.a_m, a)
        if self.cfg.mode == "dynamic":
            self._fill(self.w_m, 0.0)
            self._fill(self.s_alpha, self.cfg.scale_init)

    def coefficients(self, h):
        """A_m (..., U, m): the weight of piece u in fraction f of the sublayer input."""
        if self.cfg.mode == "mhc":
            return ops.mhc_pre(h, self.pre_proj, self.pre_bias, self.pre_scale, self.cfg.eps).unsqueeze(-1)
        if self.cfg.mode == "dynamic":
            x = ops.rms_normed(h, self.cfg.eps)
            return self.a_m + self.s_alpha * torch.tanh(x.to(self.w_m.dtype) @ self.w_m)
        return self.a_m

    def forward(self, h):
        self._check(h)
        if self.cfg.mode == "mhc":
            return self._run_mhc("mhc_read", h, self.pre_proj, self.pre_bias, self.pre_scale,
                                 self.cfg.eps), h
        fused = self._fused(h)
        if fused:
            dyn = self.cfg.mode == "dynamic"
            return fused.read(h, self.a_m, self.w_m if dyn else None,
                              self.s_alpha if dyn else None, self.cfg.eps)
        return ops.mix(self.coefficients(h), h).flatten(-2), h


@register
class HCWrite(_Connection):
    """Depth and width connection: H'_t = sum_u A_r[u, t] H_u + sum_f B[f, t] y_f."""

    type_name = "hc_write"
    example = ({"mode": "dynamic"}, [streams(6, 8, frac=2), hidden(16)])  # for the smoke test
    inputs = ("streams", "y")

    @dataclass(frozen=True)
    class Config:
        mode: str = param("static", "static (SHC), dynamic (DHC) or mhc (doubly stochastic "
                                    "residual matrix by Sinkhorn-Knopp, post gate 2 sigmoid)",
                          choices=MODES)
        scale_init: float = param(0.01, "initial scales s_alpha, s_beta of the dynamic part",
                                  min=0.0, max=10.0)
        eps: float = param(1e-6, "eps of the norm the dynamic part reads", min=0.0, max=1.0)
        sinkhorn_iters: int = param(20, "mhc: Sinkhorn-Knopp iterations (row then column)",
                                    min=1, max=1000)
        impl: str = param("torch", IMPL_DOC, choices=IMPLS)

    @classmethod
    def check_config(cls, cfg):
        return _check_impl(cfg)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        h = _streams_in(ins, cfg)
        y = expect(ins, 1, "hidden")
        if (y.width, y.seq) != (h.width * (h.frac or 1), h.seq):
            raise KindError(f"the sublayer output {y} does not match the streams {h}", 1)
        return (h,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        u, w, m = self.u, self.w, self.m
        if cfg.mode == "mhc":
            self.res_bias = nn.Parameter(torch.zeros(u, u))
            self.res_proj = nn.Parameter(torch.zeros(u * w, u * u))
            self.res_scale = self._scale()
            self.post_bias = nn.Parameter(torch.zeros(u))
            self.post_proj = nn.Parameter(torch.zeros(u * w, u))
            self.post_scale = self._scale()
        else:
            self.a_r = nn.Parameter(torch.eye(u))
            self.beta = nn.Parameter(torch.zeros(m, u))
            if cfg.mode == "dynamic":
                self.w_r = nn.Parameter(torch.zeros(w, u))
                self.w_beta = nn.Parameter(torch.zeros(w, m))
                self.s_alpha = self._scale()
                self.s_beta = self._scale()

    def init_weights(self, gen):
        s = self.cfg.scale_init
        if self.cfg.mode == "mhc":
            self._fill(self.res_bias, MHC_RES_LOGIT * torch.eye(self.u))
            for t, v in ((self.res_proj, 0.0), (self.res_scale, s), (self.post_bias, 0.0),
                         (self.post_proj, 0.0), (self.post_scale, s)):
                self._fill(t, v)
            return
        self._fill(self.a_r, torch.eye(self.u))
        beta = torch.zeros(self.m, self.u)
        beta[torch.arange(self.u) % self.m, torch.arange(self.u)] = 1.0  # fraction f -> every stream's f
        self._fill(self.beta, beta)
        if self.cfg.mode == "dynamic":
            for t, v in ((self.w_r, 0.0), (self.w_beta, 0.0), (self.s_alpha, s), (self.s_beta, s)):
                self._fill(t, v)

    def res_matrix(self, h):
        """mhc: DeepSeek's H_res (..., n, n), doubly stochastic; x'_i = sum_j H_res[i, j] x_j."""
        return ops.mhc_res(h, self.res_proj, self.res_bias, self.res_scale, self.cfg.eps,
                           self.cfg.sinkhorn_iters)

    def coefficients(self, h):
        """(A_r (..., U, U), B (..., m, U)) as in H'_t = sum_u A_r[u, t] H_u + sum_f B[f, t] y_f."""
        if self.cfg.mode == "mhc":
            post = ops.mhc_post(h, self.post_proj, self.post_bias, self.post_scale, self.cfg.eps)
            return self.res_matrix(h).transpose(-1, -2), post.unsqueeze(-2)
        if self.cfg.mode == "dynamic":
            x = ops.rms_normed(h, self.cfg.eps).to(self.w_r.dtype)
            a_r = self.a_r + self.s_alpha * torch.tanh(x @ self.w_r)
            beta = self.beta + self.s_beta * torch.tanh(x @ self.w_beta).transpose(-1, -2)
            return a_r, beta
        return self.a_r, self.beta

    def forward(self, h, y):
        self._check(h)
        if self.cfg.mode == "mhc":
            return self._run_mhc("mhc_write", h, y, self.res_proj, self.res_bias, self.res_scale,
                                 self.post_proj, self.post_bias, self.post_scale, self.cfg.eps,
                                 self.cfg.sinkhorn_iters)
        fused = self._fused(h, y)
        if fused and self.cfg.mode == "dynamic":
            return fused.write(h, y, self.a_r, self.beta, self.w_r, self.w_beta, self.s_alpha,
                               self.s_beta, self.cfg.eps)
        if fused:
            return fused.write(h, y, self.a_r, self.beta)
        a_r, beta = self.coefficients(h)
        return ops.mix(a_r, h) + ops.mix(beta, ops.split(y, self.m))

