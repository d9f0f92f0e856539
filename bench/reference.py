"""nanoGPT-style GPT-2 and a Transformer++ (Llama-style), hand-written as the speed baseline.

Deliberately plain: one class per block, fused q|k|v, SDPA with is_causal, the tied LM head.
Submodule names follow graphs/gpt2.yaml and graphs/llama.yaml so that a graph model's
state_dict loads here unchanged, and the benchmark can check both compute the same loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 50304
    seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    rope_theta: float = 10000.0


class CausalSelfAttention(nn.Module):
    def __init__(self, c: Config, bias: bool, rope: bool):
        super().__init__()
        self.h, self.kv, self.dh = c.n_head, c.n_kv_head, c.d_model // c.n_head
        self.qkv = nn.Linear(c.d_model, (self.h + 2 * self.kv) * self.dh, bias=bias)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=bias)
        self.rope = rope
        if rope:
            inv = 1.0 / c.rope_theta ** (torch.arange(0, self.dh, 2).float() / self.dh)
            ang = torch.outer(torch.arange(c.seq_len).float(), inv)
            ang = torch.cat([ang, ang], dim=-1)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

    def _rope(self, x, t):
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], dim=-1)
        q = q.view(b, t, self.h, self.dh).transpose(1, 2)
        k = k.view(b, t, self.kv, self.dh).transpose(1, 2)
        v = v.view(b, t, self.kv, self.dh).transpose(1, 2)
        if self.rope:
            q, k = self._rope(q, t), self._rope(k, t)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.fc = nn.Linear(c.d_model, c.d_ff)
        self.proj = nn.Linear(c.d_ff, c.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.fc = nn.Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class GPT2Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c, bias=True, rope=False)
        self.ln_2 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LlamaBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model)
        self.attn = CausalSelfAttention(c, bias=False, rope=True)
        self.mlp_norm = RMSNorm(c.d_model)
        self.mlp = SwiGLU(c)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT2(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.seq_len, c.d_model)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.tok.weight)  # tied head
        loss = None if targets is None else F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model)

    def forward(self, idx, targets=None):
        x = self.tok(idx)
        for block in self.layers:
            x = block(x)
        logits = F.linear(self.norm(x), self.tok.weight)  # tied head
        loss = None if targets is None else F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def load_from_graph(ref: nn.Module, graph_model: nn.Module) -> None:
    """Copy a graph model's weights (tied head dropped: it is the token table)."""
    sd = {k.replace(".weight", ".weight"): v for k, v in graph_model.state_dict().items()
          if k != "head.weight"}
    ref.load_state_dict(sd, strict=True)
