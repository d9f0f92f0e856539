"""Multi-head latent attention with decoupled RoPE (DeepSeek-V2, arXiv 2405.04434).

Keys and values come from one low-rank latent c_kv = RMSNorm(W_dkv x) of width kv_rank; queries
from c_q = RMSNorm(W_dq x) (or straight from x when q_rank is null). Each head's query and key
are [content; rotary]: the content parts are up-projections of the latents, the rotary query part
is per head, and one rotary key part k_r = RoPE(W_kr x) is shared by all heads. The scale is
1/sqrt(head_dim + rope_dim). Layouts follow Hugging Face's DeepseekV3Attention: `kv_down` gives
[c_kv | k_r], `q_up` gives per head [content | rotary], `kv_up` per head [k content | v]; our
RoPE is half-split (HF's `rope_interleave` permutes the rotary rows).

Training uses the naive path (`forward`). `absorbed` is the inference form: W_uk folds into the
query and W_uv into the output projection, so attention runs over the cache [c_kv | k_r] alone
(kv_rank + rope_dim values per token per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.attention import apply_rope, rope_tables
from blocks.common import fill_, normal_, same_hidden
from blocks.kinds import KindError, hidden
from blocks.twins import rms_norm
from blocks.registry import Block, param, register


@register
class MLA(Block):
    """Multi-head latent attention: keys and values from a small cached latent, decoupled RoPE."""

    type_name, family = "mla", "attention_mla"
    example = ({"heads": 2, "kv_rank": 8, "q_rank": 12, "rope_dim": 4}, [hidden(16)])  # smoke test

    @dataclass(frozen=True)
    class Config:
        heads: int = param(doc="attention heads (DeepSeek-V2: 128)", min=1, max=4096)
        kv_rank: int = param(doc="width d_c of the cached key/value latent (V2: 512)", min=1, max=1 << 16)
        rope_dim: int = param(doc="rotary width d_R of each query head and the shared key (V2: 64)",
                              min=2, max=4096)
        q_rank: int | None = param(None, "width d_c' of the query latent (V2: 1536); null: queries "
                                   "straight from x (V2-Lite)", min=1, max=1 << 16)
        head_dim: int | None = param(None, "content width of a query/key head (default d / heads)",
                                     min=1, max=4096)
        v_head_dim: int | None = param(None, "width of a value head (default head_dim)", min=1, max=4096)
        rope_theta: float = param(10000.0, "RoPE base", min=1.0, max=1e9)
        eps: float = param(1e-6, "eps of the latent RMSNorms", min=0.0, max=1.0)
        std: float = param(0.02, "init of the down/up projections: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        (k,) = same_hidden(ins, allow_streams=False)
        if cfg.head_dim is None and k.width % cfg.heads:
            raise KindError(f"width d={k.width} is not divisible by heads={cfg.heads}; set head_dim", 0)
        if cfg.rope_dim % 2:
            raise KindError(f"rope_dim={cfg.rope_dim} must be even", 0)
        return (k,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        d = ins[0].width
        self.h, self.r, self.dr = cfg.heads, cfg.kv_rank, cfg.rope_dim
        self.dh = cfg.head_dim or d // cfg.heads
        self.dv = cfg.v_head_dim or self.dh
        q_out = self.h * (self.dh + self.dr)
        if cfg.q_rank:
            self.q_down = nn.Linear(d, cfg.q_rank, bias=False)
            self.q_norm = nn.Parameter(torch.ones(cfg.q_rank))
            self.q_up = nn.Linear(cfg.q_rank, q_out, bias=False)
        else:
            self.q_up = nn.Linear(d, q_out, bias=False)
        self.kv_down = nn.Linear(d, self.r + self.dr, bias=False)
        self.kv_norm = nn.Parameter(torch.ones(self.r))
        self.kv_up = nn.Linear(self.r, self.h * (self.dh + self.dv), bias=False)
        self.proj = nn.Linear(self.h * self.dv, d, bias=False)
        cos, sin = rope_tables(ctx.seq_len, self.dr, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, gen):
        for lin in (getattr(self, "q_down", None), self.q_up, self.kv_down, self.kv_up):
            if lin is not None:
                normal_(lin.weight, self.cfg.std, gen)
        normal_(self.proj.weight, self.cfg.proj_std, gen)
        fill_(getattr(self, "q_norm", None), 1.0)
        fill_(self.kv_norm, 1.0)

    def _rope(self, x):
        t = x.shape[2]
        return apply_rope(x, self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype))

    def latents(self, x):
        """q content [B,H,T,dh], q rotary [B,H,T,dR], cache (c_kv [B,T,r], k_r [B,1,T,dR])."""
        b, t, _ = x.shape
        cq = rms_norm(self.q_down(x), self.q_norm, self.cfg.eps) if self.cfg.q_rank else x
        q = self.q_up(cq).view(b, t, self.h, self.dh + self.dr).transpose(1, 2)
        q_c, q_r = q.split([self.dh, self.dr], dim=-1)
        c_kv, k_r = self.kv_down(x).split([self.r, self.dr], dim=-1)
        c_kv = rms_norm(c_kv, self.kv_norm, self.cfg.eps)
        return q_c, self._rope(q_r), c_kv, self._rope(k_r.unsqueeze(1))

    def forward(self, x):
        b, t, _ = x.shape
        q_c, q_r, c_kv, k_r = self.latents(x)
        kv = self.kv_up(c_kv).view(b, t, self.h, self.dh + self.dv).transpose(1, 2)
        k_c, v = kv.split([self.dh, self.dv], dim=-1)
        q = torch.cat([q_c, q_r], dim=-1)
        k = torch.cat([k_c, k_r.expand(-1, self.h, -1, -1)], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(self.dh + self.dr) ** -0.5)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.h * self.dv))

    def absorbed(self, x):
        """The inference form over the latent cache; returns (output, (c_kv, k_r))."""
        q_c, q_r, c_kv, k_r = self.latents(x)
        w = self.kv_up.weight.view(self.h, self.dh + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dh], w[:, self.dh:]                # [H, dh, r], [H, dv, r]
        q_lat = q_c @ w_uk                                           # W_uk folded into the query
        q = torch.cat([q_lat, q_r], dim=-1)                          # [B, H, T, r + dR]
        k = torch.cat([c_kv.unsqueeze(1), k_r], dim=-1)              # one key head: [B, 1, T, r + dR]
        y_lat = F.scaled_dot_product_attention(q, k, c_kv.unsqueeze(1), is_causal=True,
                                               scale=(self.dh + self.dr) ** -0.5, enable_gqa=True)
        w_o = self.proj.weight.view(-1, self.h, self.dv)             # [d, H, dv]
        w_out = torch.einsum("dhv,hvr->dhr", w_o, w_uv)              # W_uv folded into W_o
        return torch.einsum("bhtr,dhr->btd", y_lat, w_out), (c_kv, k_r)
