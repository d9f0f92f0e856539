"""Causal self-attention with the common variants as options, through `blocks.attention_ops`.

Options: grouped KV heads (GQA/MQA), RoPE (full or partial), QK-norm, sliding window (an
expression of `layer` gives local/global layers), ALiBi, attention-logit softcap, and value
residual (ResFormer): values may come in from outside (a `linear` node) and be mixed with the
first layer's values, read across layers as `v@0`. With every option off the block is exactly
the plain SDPA attention of GPT-2 and Llama.

RoPE follows the Hugging Face / NeoX half-split convention: pair (x_i, x_{i + r/2}) of the
first r = rope_fraction * head_dim channels rotates by angle p * theta^(-2i/r).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks.attention_ops import KERNELS, Scores, alibi_slopes, attend, prepare_flex
from blocks.common import fill_, normal_
from blocks.kinds import KindError, expect, expect_count, hidden
from blocks.liger import IMPL_DOC, IMPLS, run
from blocks.registry import Block, param, register
from blocks.twins import rms_norm


def rope_tables(max_seq: int, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [max_seq, rot_dim] in fp32 (half-split layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x's last dimension; the rest pass unchanged.
    cos and sin broadcast against x: [T, r] for x [B, H, T, D], [T, 1, r] for x [B, T, H, D]."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def variants(cfg) -> list[str]:
    """The options set beyond plain attention: exporters without them must refuse the graph."""
    on = {"qk_norm": cfg.qk_norm, "window": cfg.window is not None, "alibi": cfg.alibi,
          "softcap": cfg.softcap is not None}
    return [name for name, set_ in on.items() if set_]


@register
class Attention(Block):
    """Multi-head causal self-attention (MHA; GQA/MQA when kv_heads < heads) and its variants."""

    type_name, family = "attention", "attention"
    example = ({"heads": 4, "kv_heads": 2, "rope": True}, [hidden(16)])  # for the registry's smoke test
    inputs = ("x", "v", "v_first")

    @dataclass(frozen=True)
    class Config:
        heads: int = param(doc="query heads", min=1, max=4096)
        kv_heads: int | None = param(None, "key/value heads (default: heads); query head i "
                                     "uses kv head i // (heads / kv_heads)", min=1, max=4096)
        head_dim: int | None = param(None, "width of a head (default: d / heads)", min=1, max=4096)
        bias: bool = param(False, "biases on the q/k/v and output projections")
        rope: bool = param(False, "rotary position embedding on q and k")
        rope_theta: float = param(10000.0, "RoPE base", min=1.0, max=1e9)
        rope_fraction: float = param(1.0, "share of each head's channels that rotate", min=0.0, max=1.0)
        dropout: float = param(0.0, "attention-probability dropout (training only)", min=0.0, max=1.0)
        std: float = param(0.02, "init of the q/k/v projection: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection: N(0, proj_std); GPT-2 "
                                "uses 0.02 / sqrt(2 * n_layer)", min=0.0, max=10.0)
        qk_norm: bool = param(False, "RMSNorm of each q and k head over head_dim (learned gain "
                              "shared by heads, eps 1e-6), before RoPE")
        window: int | None = param(None, "sliding window: query i sees keys i-window+1..i (null: "
                                   "all earlier keys); e.g. if(layer % 2 == 0, 128, seq_len)",
                                   min=1, max=1 << 24)
        alibi: bool = param(False, "ALiBi: add -m_h * (i - j) to the scores, m_h = 2^(-8h/H)")
        softcap: float | None = param(None, "attention-logit cap c: s <- c * tanh(s / c) after "
                                      "scaling (Gemma 2: 50); SDPA cannot, Flex or eager can",
                                      min=1e-3, max=1e6)
        kernel: str = param("auto", "sdpa, flex (compiled FlexAttention on CUDA), eager (explicit "
                            "masked twin); auto = sdpa unless softcap, then flex on CUDA",
                            choices=KERNELS)
        value_mix: float = param(0.5, "value residual: v <- (1 - m) * v + m * v_first (initial m "
                                 "when learned)", min=0.0, max=1.0)
        value_mix_learn: bool = param(True, "value residual: learn the two mixing scalars")
        impl: str = param("torch", "RoPE " + IMPL_DOC + "; liger needs rope_fraction 1",
                          choices=IMPLS)

    @classmethod
    def check_config(cls, cfg):
        kv = cfg.kv_heads or cfg.heads
        if cfg.heads % kv:
            return f"heads={cfg.heads} must be a multiple of kv_heads={kv}"
        if cfg.kernel == "sdpa" and cfg.softcap is not None:
            return "kernel sdpa cannot softcap attention logits; use flex, eager or auto"
        if cfg.kernel == "flex" and cfg.dropout:
            return "kernel flex has no attention dropout; use sdpa, eager or auto"
        return None

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, (1, 3))
        k = expect(ins, 0, "hidden")
        if cfg.head_dim is None and k.width % cfg.heads:
            raise KindError(f"width d={k.width} is not divisible by heads={cfg.heads}; "
                            "set head_dim or change heads", 0)
        head_dim = cfg.head_dim or k.width // cfg.heads
        if cfg.rope and int(head_dim * cfg.rope_fraction) % 2:
            raise KindError(f"RoPE needs an even number of rotated channels, got "
                            f"{int(head_dim * cfg.rope_fraction)} (head_dim={head_dim})", 0)
        v_width = (cfg.kv_heads or cfg.heads) * head_dim
        for i in range(1, len(ins)):
            if ins[i] != hidden(v_width, k.seq):
                raise KindError(f"input {i + 1} ({cls.inputs[i]}) must be values "
                                f"{hidden(v_width, k.seq)} (kv_heads * head_dim), got {ins[i]}", i)
        return (k,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.h = cfg.heads
        self.kv = cfg.kv_heads or cfg.heads
        self.dh = cfg.head_dim or d // cfg.heads
        self.external_v = len(ins) > 1
        n_proj = self.h + (1 if self.external_v else 2) * self.kv
        self.qkv = nn.Linear(d, n_proj * self.dh, bias=cfg.bias)
        self.proj = nn.Linear(self.h * self.dh, d, bias=cfg.bias)
        if cfg.rope:
            cos, sin = rope_tables(ctx.seq_len, int(self.dh * cfg.rope_fraction), cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(self.dh))
            self.k_norm = nn.Parameter(torch.ones(self.dh))
        if cfg.alibi:
            self.register_buffer("slopes", alibi_slopes(self.h), persistent=False)
        # Layer 0 reads its own values as `v@0`: the first layer is the one that is not mixed.
        self.mixes = len(ins) == 3 and ctx.layer != 0
        if self.mixes:
            self.value_lambda = nn.Parameter(torch.empty(2), requires_grad=cfg.value_mix_learn)
        self.scores = Scores(cfg.window, cfg.softcap, cfg.alibi)

    def init_weights(self, gen):
        normal_(self.qkv.weight, self.cfg.std, gen)
        normal_(self.proj.weight, self.cfg.proj_std, gen)
        fill_(self.qkv.bias, 0.0)
        fill_(self.proj.bias, 0.0)
        for name in ("q_norm", "k_norm"):
            fill_(getattr(self, name, None), 1.0)
        if self.mixes:
            fill_(self.value_lambda[0], 1.0 - self.cfg.value_mix)
            fill_(self.value_lambda[1], self.cfg.value_mix)

    def heads(self, x, v=None, v_first=None):
        """q [B, H, T, dh] and k, v [B, H_kv, T, dh] after QK-norm, RoPE and value mixing."""
        b, t, _ = x.shape
        sizes = [self.h * self.dh, self.kv * self.dh] + ([] if self.external_v else [self.kv * self.dh])
        q, k, *own = self.qkv(x).split(sizes, dim=-1)
        v = own[0] if own else v
        if self.mixes:
            lam = self.value_lambda.to(v.dtype)
            v = lam[0] * v + lam[1] * v_first
        # QK-norm and RoPE work in the [B, T, H, dh] layout the projection wrote; q, k and v are
        # transposed for attention after them: in the [B, H, T, dh] layout the fused backward of
        # RoPE wrote the projection's gradient strided (3 ms of a 38 ms step on an H100)
        q, k, v = q.view(b, t, self.h, self.dh), k.view(b, t, self.kv, self.dh), v.view(b, t, self.kv, self.dh)
        if self.cfg.qk_norm:
            q, k = rms_norm(q, self.q_norm, 1e-6), rms_norm(k, self.k_norm, 1e-6)
        if self.cfg.rope:
            cos, sin = self.rope_cos[:t].to(q.dtype), self.rope_sin[:t].to(q.dtype)
            if self.cfg.impl != "torch" and self.cfg.rope_fraction == 1.0:   # Liger's: [B, H, T, dh]
                q, k = run("rope", self.cfg.impl, q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            else:
                q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def prepare_masks(self, t: int, device: torch.device) -> None:
        """Called outside compiled regions before a forward over t tokens (graphs.compile)."""
        prepare_flex(self.scores, self.cfg.kernel, t, device)

    def forward(self, x, v=None, v_first=None):
        b, t, _ = x.shape
        q, k, v = self.heads(x, v, v_first)
        p = self.cfg.dropout if self.training else 0.0
        y = attend(q, k, v, self.scores, self.cfg.kernel, getattr(self, "slopes", None), p)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.h * self.dh))
