"""Causal self-attention through `scaled_dot_product_attention`, with optional RoPE and GQA.

RoPE follows the Hugging Face / NeoX half-split convention: pair (x_i, x_{i + r/2}) of the
first r = rope_fraction * head_dim channels rotates by angle p * theta^(-2i/r).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.common import fill_, normal_, same_hidden
from blocks.kinds import KindError, hidden
from blocks.registry import Block, param, register


def rope_tables(max_seq: int, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [max_seq, rot_dim] in fp32 (half-split layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B, H, T, D]; the rest pass unchanged."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


@register
class Attention(Block):
    """Multi-head causal self-attention (MHA; GQA/MQA when kv_heads < heads)."""

    type_name, family = "attention", "attention"
    example = ({"heads": 4, "kv_heads": 2, "rope": True}, [hidden(16)])  # for the registry's smoke test

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

    @classmethod
    def check_config(cls, cfg):
        kv = cfg.kv_heads or cfg.heads
        if cfg.heads % kv:
            return f"heads={cfg.heads} must be a multiple of kv_heads={kv}"
        return None

    @classmethod
    def infer(cls, cfg, ins):
        (k,) = same_hidden(ins, allow_streams=False)
        if cfg.head_dim is None and k.width % cfg.heads:
            raise KindError(f"width d={k.width} is not divisible by heads={cfg.heads}; "
                            "set head_dim or change heads", 0)
        head_dim = cfg.head_dim or k.width // cfg.heads
        if cfg.rope and int(head_dim * cfg.rope_fraction) % 2:
            raise KindError(f"RoPE needs an even number of rotated channels, got "
                            f"{int(head_dim * cfg.rope_fraction)} (head_dim={head_dim})", 0)
        return (k,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.h = cfg.heads
        self.kv = cfg.kv_heads or cfg.heads
        self.dh = cfg.head_dim or d // cfg.heads
        self.qkv = nn.Linear(d, (self.h + 2 * self.kv) * self.dh, bias=cfg.bias)
        self.proj = nn.Linear(self.h * self.dh, d, bias=cfg.bias)
        if cfg.rope:
            cos, sin = rope_tables(ctx.seq_len, int(self.dh * cfg.rope_fraction), cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, gen):
        normal_(self.qkv.weight, self.cfg.std, gen)
        normal_(self.proj.weight, self.cfg.proj_std, gen)
        fill_(self.qkv.bias, 0.0)
        fill_(self.proj.bias, 0.0)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], dim=-1)
        q = q.view(b, t, self.h, self.dh).transpose(1, 2)
        k = k.view(b, t, self.kv, self.dh).transpose(1, 2)
        v = v.view(b, t, self.kv, self.dh).transpose(1, 2)
        if self.cfg.rope:
            cos, sin = self.rope_cos[:t].to(q.dtype), self.rope_sin[:t].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv != self.h:  # HF repeat_kv order: query head i reads kv head i // (h / kv)
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.h * self.dh))
