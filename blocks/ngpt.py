"""nGPT (arXiv 2410.01131): the normalised Transformer, every vector on the unit hypersphere.

The token embedding, the q/k/v and MLP input projections and the output embedding have unit rows
along the model width d; the attention and MLP output projections have unit columns (they are
[d, in] and also normalised along d). After every optimizer step the trainer calls `after_step`,
which retracts the matrices back onto the sphere. Hidden states move by a spherical "lerp":
h <- Norm(h + alpha * (Norm(h_block) - h)). There are no norm layers and no weight decay.

Scaling vectors use the paper's trick: stored as a parameter p initialised to `scale` and used as
p * (init / scale), which gives each vector its own effective learning rate under one Adam lr.

Every normalisation runs in fp32 and the residual stream stays fp32: under bf16 autocast the
error of many chained L2 normalisations compounds (pytorch#168126), so we never let Inductor keep
a bf16 intermediate between them. Each ambiguity of the paper versus its reference code is a knob:
`out_axis` (which axis the output projections are normalised along), `abs_alpha` (the reference
takes |alpha|), `renorm` (retraction on or off), `sqk_scale` (1/sqrt(d) in the paper's code,
lucidrains uses 1/d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.attention import apply_rope, rope_tables
from blocks.common import normal_, same_hidden
from blocks.embeddings import MAX_DIM, MAX_VOCAB, Embedding
from blocks.heads import LMHead
from blocks.kinds import KindError, expect, expect_count, hidden, tokens
from blocks.registry import Block, param, register

# nGPT trains without warmup and without weight decay; a graph using these blocks is refused
# when its training recipe says otherwise (checked where the graph is elaborated).
NGPT_RULES = {"warmup": 0.0}
AXES = ("width", "input")


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16/fp16 are upcast; fp64 stays, for the parity tests)."""
    return x.float() if x.element_size() < 4 else x


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along `dim`, computed and returned in at least fp32."""
    return F.normalize(wide(x), dim=dim, eps=1e-12)


@torch.no_grad()
def retract_(w: torch.Tensor, dim: int) -> None:
    """Normalise a weight in place along `dim` (fp32 arithmetic, written back in w's dtype)."""
    if w.device.type == "meta":
        return
    if w.element_size() >= 4:   # in place, as F.normalize computes it: no copy of the weight
        w.div_(torch.linalg.vector_norm(w, dim=dim, keepdim=True).clamp_min_(1e-12))
    else:
        w.copy_(unit(w, dim).to(w.dtype))


COMPILED_RETRACTION_ON = ("cuda",)   # device types whose after-step retraction is compiled


@torch.compile(dynamic=False)
def _retract_all(ws: list[torch.Tensor], axes: tuple[int, ...]) -> None:
    with torch.no_grad():
        for w, axis in zip(ws, axes):
            if w.element_size() >= 4:
                w.div_(torch.linalg.vector_norm(w, dim=axis, keepdim=True).clamp_min(1e-12))
            else:
                w.copy_(unit(w, axis).to(w.dtype))


class ScaleVector(nn.Module):
    """A learnable fp32 vector stored as p = `scale` and used as p * (init / scale)."""

    def __init__(self, n: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = init, scale
        self.p = nn.Parameter(torch.empty(n))

    def reset(self) -> None:
        if self.p.device.type != "meta":
            with torch.no_grad():
                self.p.fill_(self.scale)

    def forward(self) -> torch.Tensor:
        return self.p * (self.init / self.scale)


class _Sphere(Block):
    """Shared by the weight-bearing nGPT blocks: init N(0, 1/sqrt(d)) then unit-normalise,
    retract after each step (when `renorm`), no weight decay."""

    has_after_step = True
    recipe_rules = NGPT_RULES
    matrices: tuple[tuple[str, int], ...] = ()     # (parameter name, axis normalised to 1)

    def normalised(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, tensor, axis) of every matrix this block keeps on the sphere."""
        return [(n, self.get_parameter(n), axis) for n, axis in self.matrices]

    def init_weights(self, gen):
        for _, w, axis in self.normalised():
            normal_(w, 1.0 / math.sqrt(self.d), gen)
            retract_(w, axis)   # the reference runs normalize_matrices() before step 0
        for m in self.modules():
            if isinstance(m, ScaleVector):
                m.reset()

    def no_decay(self):
        return {n for n, _ in self.named_parameters()}

    def after_step(self):
        if self.cfg.renorm:
            for _, w, axis in self.normalised():
                retract_(w, axis)

    @classmethod
    def after_step_all(cls, blocks):
        """Every nGPT matrix of the model at once: on CUDA one compiled function (Inductor's
        fused norm-and-divide per matrix, launched from one graph) instead of three eager ops per
        matrix, which left the GPU idle behind the host; elsewhere the eager retraction."""
        pairs = [(w, axis) for b in blocks if b.cfg.renorm for _, w, axis in b.normalised()]
        if not pairs or pairs[0][0].device.type not in COMPILED_RETRACTION_ON:
            for w, axis in pairs:
                retract_(w, axis)
            return
        _retract_all([w for w, _ in pairs], tuple(axis for _, axis in pairs))


def _out_axis(cfg) -> int:
    """Axis of a [d, in] output projection that is normalised: 0 = model width (the reference)."""
    return 0 if cfg.out_axis == "width" else 1


@register
class NGPTEmbedding(_Sphere):
    """Token ids -> unit-norm rows of a [vocab, d] table (no positional embedding)."""

    type_name, family = "ngpt_embedding", "ngpt"
    example = ({"vocab": 50, "dim": 16}, [tokens(50)])  # for the registry's smoke test
    inputs = ("ids",)
    lookup_table = True
    matrices = (("weight", 1),)

    @dataclass(frozen=True)
    class Config:
        vocab: int = param(doc="rows in the table (>= the ids' vocabulary)", min=1, max=MAX_VOCAB)
        dim: int = param(doc="width of the residual stream", min=1, max=MAX_DIM)
        renorm: bool = param(True, "renormalise the rows after every optimizer step")

    @classmethod
    def infer(cls, cfg, ins):
        return Embedding.infer(cfg, ins)   # the same rules as any lookup table

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.d = cfg.dim
        self.weight = nn.Parameter(torch.empty(cfg.vocab, cfg.dim))

    def forward(self, idx):
        return wide(F.embedding(idx, self.weight))


@register
class NGPTAttention(_Sphere):
    """h_A = W_o attn(q, k, v): RoPE, then per-head unit q and k times s_qk, softmax scale
    +sqrt(d_h) (q.k are cosines times s_qk^2), causal. Returns h_A; `ngpt_residual` adds it."""

    type_name, family = "ngpt_attention", "ngpt"
    example = ({"heads": 4}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        heads: int = param(doc="attention heads (head width d / heads)", min=1, max=4096)
        rope: bool = param(True, "rotary position embedding on q and k (before the norm)")
        rope_theta: float = param(10000.0, "RoPE base", min=1.0, max=1e9)
        rope_fp32: bool = param(False, "rotate q and k in fp32; off (faster: 1.5% of the step on an "
                                "H100) rotates them in the compute dtype, q and k are normalised in fp32 either way")
        qk_norm: bool = param(True, "normalise q and k per head (nGPT); off gives plain scores")
        sqk_init: float = param(1.0, "effective s_qk at init", min=0.0, max=1e3)
        sqk_scale: float | None = param(None, "stored value of s_qk (default 1/sqrt(d))", min=1e-9, max=1e3)
        renorm: bool = param(True, "renormalise the matrices after every optimizer step")
        out_axis: str = param("width", "axis of the output projection kept at unit norm: width "
                              "(dim 0, the reference) or input (dim 1)", choices=AXES)

    @classmethod
    def infer(cls, cfg, ins):
        (k,) = same_hidden(ins, allow_streams=False)
        if k.width % cfg.heads:
            raise KindError(f"width d={k.width} is not divisible by heads={cfg.heads}", 0)
        if cfg.rope and (k.width // cfg.heads) % 2:
            raise KindError(f"RoPE needs an even head width, got {k.width // cfg.heads}", 0)
        return (k,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.d = d = ins[0].width
        self.h, self.dh = cfg.heads, d // cfg.heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)     # rows are the q, k, v units: norm along d
        self.proj = nn.Linear(d, d, bias=False)
        self.s_qk = ScaleVector(d, cfg.sqk_init, cfg.sqk_scale or 1.0 / math.sqrt(d))
        self.matrices = (("qkv.weight", 1), ("proj.weight", _out_axis(cfg)))
        if cfg.rope:
            cos, sin = rope_tables(ctx.seq_len, self.dh, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        # q and k are rotated and normalised in the [B, T, H, dh] layout the projection wrote and
        # transposed for attention only after: in the [B, H, T, dh] layout the fused backward of
        # RoPE wrote the projection's gradient strided (3 ms of a 45 ms step on an H100)
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.dh).unbind(2)
        cd = v.dtype
        if self.cfg.rope:
            if self.cfg.rope_fp32:
                q, k = wide(q), wide(k)
            cos, sin = self.rope_cos[:t, None].to(q.dtype), self.rope_sin[:t, None].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(self.dh)
        if self.cfg.qk_norm:   # in fp32 whatever the rotation's dtype: q.k are cosines here
            s = self.s_qk().view(self.h, self.dh)
            q, k = s * unit(q), s * unit(k)
            scale = math.sqrt(self.dh)
        q, k, v = (z.to(cd).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.d))


@register
class NGPTMLP(_Sphere):
    """h_M = W_o (u * silu(nu)), u = s_u (h W_u), nu = s_nu (h W_nu) sqrt(d); W_u and W_nu are one
    fused projection `fc` = [u; nu] with one scaling vector s_uv = [s_u; s_nu]."""

    type_name, family = "ngpt_mlp", "ngpt"
    example = ({"hidden": 32}, [hidden(16)])  # for the registry's smoke test

    @dataclass(frozen=True)
    class Config:
        hidden: int = param(doc="inner width (nGPT: 4 d)", min=1, max=1 << 22)
        suv_init: float = param(1.0, "effective s_u and s_nu at init", min=0.0, max=1e3)
        suv_scale: float = param(1.0, "stored value of s_u and s_nu", min=1e-9, max=1e3)
        renorm: bool = param(True, "renormalise the matrices after every optimizer step")
        out_axis: str = param("width", "axis of the output projection kept at unit norm: width "
                              "(dim 0, the reference) or input (dim 1)", choices=AXES)

    @classmethod
    def infer(cls, cfg, ins):
        return same_hidden(ins, allow_streams=False)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.d = d = ins[0].width
        self.fc = nn.Linear(d, 2 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, d, bias=False)
        self.s_uv = ScaleVector(2 * cfg.hidden, cfg.suv_init, cfg.suv_scale)
        self.matrices = (("fc.weight", 1), ("proj.weight", _out_axis(cfg)))

    def forward(self, x):
        # As in the reference, sqrt(d) multiplies both halves; on u it is a global scale of h_M,
        # which Norm(h_M) in the residual removes, so this equals the paper's nu-only factor.
        # The scales multiply the [2 hidden, d] rows of W, not the [B, T, 2 hidden] activations:
        # the same u and nu for 1/(B T / d) of the work, and s_uv's gradient is a reduction over
        # the weight's gradient instead of over every token (1.1 ms of 40.7 ms of H100 kernels a step)
        w = self.fc.weight * (self.s_uv() * math.sqrt(self.d))[:, None]
        u, nu = F.linear(x, w).chunk(2, dim=-1)
        return self.proj(u * F.silu(nu))


@register
class NGPTResidual(Block):
    """h <- Norm(h + alpha * (Norm(h_block) - h)), alpha a per-dimension eigen learning rate."""

    type_name, family = "ngpt_residual", "ngpt"
    example = ({}, [hidden(16), hidden(16)])  # for the registry's smoke test
    inputs = ("h", "block")
    recipe_rules = NGPT_RULES

    @dataclass(frozen=True)
    class Config:
        alpha_init: float = param(0.05, "effective alpha at init", min=0.0, max=10.0)
        alpha_scale: float | None = param(None, "stored value of alpha (default 1/sqrt(d))",
                                          min=1e-9, max=1e3)
        abs_alpha: bool = param(True, "use |alpha| (the reference code) instead of signed alpha")

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 2)
        a, b = expect(ins, 0, "hidden"), expect(ins, 1, "hidden")
        if a != b:
            raise KindError(f"both inputs must have the same kind, got {a} and {b}", 1)
        return (a,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.alpha = ScaleVector(d, cfg.alpha_init, cfg.alpha_scale or 1.0 / math.sqrt(d))

    def init_weights(self, gen):
        self.alpha.reset()

    def no_decay(self):
        return {n for n, _ in self.named_parameters()}

    def forward(self, h, block):
        a = self.alpha()
        a = a.abs() if self.cfg.abs_alpha else a
        h = wide(h)
        return unit(h + a * (unit(block) - h))


@register
class NGPTHead(_Sphere):
    """Logits z = s_z * (h E_out^T) with unit rows in E_out (untied), so |z_v| <= |s_z,v|."""

    type_name, family = "ngpt_head", "ngpt"
    example = ({"vocab": 50}, [hidden(16)])  # for the registry's smoke test
    matrices = (("weight", 1),)

    @dataclass(frozen=True)
    class Config:
        vocab: int = param(doc="number of logits", min=1, max=1 << 24)
        sz_init: float = param(1.0, "effective s_z at init", min=0.0, max=1e3)
        sz_scale: float | None = param(None, "stored value of s_z (default 1/sqrt(d))", min=1e-9, max=1e3)
        renorm: bool = param(True, "renormalise the rows after every optimizer step")

    @classmethod
    def infer(cls, cfg, ins):
        return LMHead.infer(cfg, ins)   # hidden -> logits over vocab, as any LM head

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.d = ins[0].width
        self.weight = nn.Parameter(torch.empty(cfg.vocab, self.d))
        self.s_z = ScaleVector(cfg.vocab, cfg.sz_init, cfg.sz_scale or 1.0 / math.sqrt(self.d))

    def logit_weight(self) -> torch.Tensor:
        """E_out with each row v scaled by s_z,v (a linear_cross_entropy tied to this head uses it)."""
        # s_z scales the [vocab, d] rows, not the [B, T, vocab] logits: the same z, 1/(B T / d) the work
        return self.weight * self.s_z()[:, None]

    def forward(self, x):
        return F.linear(x, self.logit_weight())
