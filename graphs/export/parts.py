"""Plain-PyTorch twins of the playground blocks, copied verbatim into exported `model.py` files.

Each class has the same parameter names as its playground block (so state_dict keys match) and
the same arithmetic (so logits match to rounding). This module is real, importable code rather
than strings so that linters and tests see it; `graphs.export.templates` picks the parts a graph
uses and `inspect.getsource` copies them. It imports only torch and math, like the export.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(max_seq: int, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq, rot_dim] in fp32, half-split (Hugging Face / NeoX) layout."""
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


ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: nGPT's chained normalisations lose accuracy in bf16."""
    return x.float() if x.element_size() < 4 else x


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along `dim`, in at least fp32."""
    return F.normalize(wide(x), dim=dim, eps=1e-12)


class ScaleVector(nn.Module):
    """nGPT's scaling vector: stored as p (trained at `scale`), used as p * (init / scale)."""

    def __init__(self, n: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = init, scale
        self.p = nn.Parameter(torch.full((n,), float(scale)))

    def forward(self) -> torch.Tensor:
        return self.p * (self.init / self.scale)


class Embedding(nn.Module):
    """A learned table of `vocab` rows of width `dim`, looked up by id."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim))

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class PositionEmbedding(nn.Module):
    """Learned absolute positions: position t -> row t, broadcast over the batch."""

    def __init__(self, max_seq: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_seq, dim))

    def forward(self, idx):
        b, t = idx.shape
        return self.weight[:t].unsqueeze(0).expand(b, t, -1)


class Linear(nn.Module):
    """A learned projection of the last dimension."""

    def __init__(self, dim_in: int, dim: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim, bias=bias)

    def forward(self, x):
        return self.proj(x)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * gain, normalised in fp32 and cast back (as Hugging Face Llama)."""

    def __init__(self, dim: int, eps: float, gain: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


class Attention(nn.Module):
    """Causal self-attention; grouped KV heads when kv_heads < heads; optional RoPE."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, bias: bool, rope: bool,
                 rope_theta: float, rope_fraction: float, dropout: float, seq_len: int):
        super().__init__()
        self.h, self.kv, self.dh, self.rope, self.dropout = heads, kv_heads, head_dim, rope, dropout
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        if rope:
            cos, sin = rope_tables(seq_len, int(head_dim * rope_fraction), rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], dim=-1)
        q = q.view(b, t, self.h, self.dh).transpose(1, 2)
        k = k.view(b, t, self.kv, self.dh).transpose(1, 2)
        v = v.view(b, t, self.kv, self.dh).transpose(1, 2)
        if self.rope:
            cos, sin = self.rope_cos[:t].to(q.dtype), self.rope_sin[:t].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv != self.h:  # query head i reads kv head i // (h / kv), as HF's repeat_kv
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.h * self.dh))


class MLP(nn.Module):
    """proj(act(fc(x))): width d -> hidden -> d."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)); gate and up are one fused projection fc = [gate; up]."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class LMHead(nn.Module):
    """hidden -> logits; a tied head's weight is replaced by the embedding's table."""

    def __init__(self, dim: int, vocab: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim))
        self.bias = nn.Parameter(torch.zeros(vocab)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class NGPTEmbedding(nn.Module):
    """Token ids -> unit-norm rows of a [vocab, d] table (nGPT has no positional embedding)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim))

    def forward(self, idx):
        return wide(F.embedding(idx, self.weight))


class NGPTAttention(nn.Module):
    """nGPT attention: RoPE, per-head unit q and k times s_qk, softmax scale +sqrt(d_h)."""

    def __init__(self, dim: int, heads: int, rope: bool, rope_theta: float, qk_norm: bool,
                 sqk_init: float, sqk_scale: float, seq_len: int):
        super().__init__()
        self.d, self.h, self.dh = dim, heads, dim // heads
        self.rope, self.qk_norm = rope, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.s_qk = ScaleVector(dim, sqk_init, sqk_scale)
        if rope:
            cos, sin = rope_tables(seq_len, self.dh, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.h, self.dh).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        if self.rope:
            q, k = wide(q), wide(k)   # rotate and normalise in fp32: q.k are cosines here
            cos, sin = self.rope_cos[:t].to(q.dtype), self.rope_sin[:t].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(self.dh)
        if self.qk_norm:
            s = self.s_qk().view(self.h, 1, self.dh)
            q, k = s * unit(q), s * unit(k)
            scale = math.sqrt(self.dh)
        y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.d))


class NGPTMLP(nn.Module):
    """h_M = proj(u * silu(nu)) with [u; nu] = fc(x) * s_uv * sqrt(d)."""

    def __init__(self, dim: int, hidden: int, suv_init: float, suv_scale: float):
        super().__init__()
        self.d = dim
        self.fc = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.s_uv = ScaleVector(2 * hidden, suv_init, suv_scale)

    def forward(self, x):
        h = self.fc(x)   # the scale joins h's dtype: an fp32 copy of [B, T, 2 hidden] doubles the MLP's memory
        u, nu = (h * (self.s_uv() * math.sqrt(self.d)).to(h.dtype)).chunk(2, dim=-1)
        return self.proj(u * F.silu(nu))


class NGPTResidual(nn.Module):
    """h <- Norm(h + alpha * (Norm(h_block) - h)), alpha a per-dimension eigen learning rate."""

    def __init__(self, dim: int, alpha_init: float, alpha_scale: float, abs_alpha: bool):
        super().__init__()
        self.abs_alpha = abs_alpha
        self.alpha = ScaleVector(dim, alpha_init, alpha_scale)

    def forward(self, h, block):
        a = self.alpha()
        a = a.abs() if self.abs_alpha else a
        h = wide(h)
        return unit(h + a * (unit(block) - h))


class NGPTHead(nn.Module):
    """Logits z = s_z * (h E_out^T), E_out with unit rows (untied)."""

    def __init__(self, dim: int, vocab: int, sz_init: float, sz_scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim))
        self.s_z = ScaleVector(vocab, sz_init, sz_scale)

    def forward(self, x):
        # s_z scales the [vocab, d] rows, not the [B, T, vocab] logits: the same z, 1/(B T / d) the work
        return F.linear(x, self.weight * self.s_z()[:, None])
