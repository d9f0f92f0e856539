"""BLT cross-attention between the byte and the patch sequences (arXiv 2412.09871 §3.2.2, §3.3.1).

`patch_cross` takes (queries, keys/values, patch map) and returns the attention output only (the
graph adds the standard residual x + attn; the reference code's doubled residual is not kept).
Its direction follows the sequence levels of its inputs:

- encoder (queries on patches, keys on bytes): each patch vector is split into `slots` query
  slots of width d_q / slots, and patch p attends only to the bytes with map == p;
- decoder (queries on bytes, keys on patches): each patch vector is split into `slots` key/value
  slots, and byte t attends only to the slots of patch map[t] - 1 (feed it a patcher's `next`
  map: the patch before its target's), none when map[t] = 0 (the output is then zero).

Q and K/V are RMS-normalised (learned gains), there is no positional encoding. The masks are
dense [queries x keys] booleans, so shapes stay static per batch (torch.compile friendly).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks.common import fill_, normal_
from blocks.kinds import KindError, expect, expect_count, hidden, patch_map
from blocks.twins import rms_norm
from blocks.registry import Block, param, register


def encoder_mask(pmap: torch.Tensor, n_patches: int, slots: int) -> torch.Tensor:
    """[B, P * slots, N]: query slot of patch p sees byte t iff pmap[t] == p."""
    p = torch.arange(n_patches, device=pmap.device).repeat_interleave(slots)
    return pmap.unsqueeze(1) == p.view(1, -1, 1)


def decoder_mask(pmap: torch.Tensor, n_patches: int, slots: int) -> torch.Tensor:
    """[B, N, P * slots]: byte t sees the slots of patch min(pmap[t], P) - 1 (none if pmap[t] = 0)."""
    p = torch.arange(n_patches, device=pmap.device).repeat_interleave(slots)
    read = pmap.clamp(max=n_patches) - 1
    return read.unsqueeze(-1) == p.view(1, 1, -1)


def masked_attention(q, k, v, mask):
    """q [B, H, L, D], k/v [B, H, S, D], mask [B, L, S] -> [B, H, L, D]; rows with no key give 0."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.float().masked_fill(~mask.unsqueeze(1), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return (probs @ v) * mask.any(-1).unsqueeze(1).unsqueeze(-1).to(v.dtype)


@register
class PatchCross(Block):
    """Cross-attention joining bytes and patches (encoder: patches read their own bytes;
    decoder: bytes read the previous patch), with `slots` slots per patch vector."""

    type_name, family = "patch_cross", "bytes"
    example = ({"heads": 2, "slots": 2}, [hidden(16, "patch"), hidden(8, "byte"), patch_map()])
    inputs = ("q", "kv", "patch_map")

    @dataclass(frozen=True)
    class Config:
        heads: int = param(doc="attention heads (divide the query slot width)", min=1, max=4096)
        slots: int = param(1, "slots per patch vector (BLT's cross_attn_k)", min=1, max=64)
        eps: float = param(1e-5, "RMSNorm epsilon of Q and K/V", min=0.0, max=1.0)
        std: float = param(0.02, "init of the q/k/v projections: N(0, std)", min=0.0, max=10.0)
        proj_std: float = param(0.02, "init of the output projection", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 3)
        q, kv = expect(ins, 0, "hidden"), expect(ins, 1, "hidden")
        expect(ins, 2, "patch_map")
        if {q.seq, kv.seq} != {"byte", "patch"}:
            raise KindError(f"joins bytes and patches: one input on each, got {q} and {kv}", 1)
        patch = q if q.seq == "patch" else kv
        if patch.width % cfg.slots:
            raise KindError(f"patch width {patch.width} is not divisible by slots={cfg.slots}",
                            0 if q is patch else 1)
        inner = q.width // cfg.slots if q is patch else q.width
        if inner % cfg.heads:
            raise KindError(f"query width {inner} is not divisible by heads={cfg.heads}", 0)
        return (q,)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        q, kv = ins[0], ins[1]
        self.encoder = q.seq == "patch"
        self.dq = q.width // cfg.slots if self.encoder else q.width
        dkv = kv.width if self.encoder else kv.width // cfg.slots
        self.q_norm = nn.Parameter(torch.ones(self.dq))
        self.kv_norm = nn.Parameter(torch.ones(dkv))
        self.wq = nn.Linear(self.dq, self.dq, bias=False)
        self.wk = nn.Linear(dkv, self.dq, bias=False)
        self.wv = nn.Linear(dkv, self.dq, bias=False)
        self.wo = nn.Linear(self.dq, self.dq, bias=False)

    def init_weights(self, gen):
        for w in (self.wq, self.wk, self.wv):
            normal_(w.weight, self.cfg.std, gen)
        normal_(self.wo.weight, self.cfg.proj_std, gen)
        fill_(self.q_norm, 1.0)
        fill_(self.kv_norm, 1.0)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.cfg.heads, -1).transpose(1, 2)

    def forward(self, q, kv, pmap):
        b, lq, dq_full = q.shape
        k = self.cfg.slots
        if self.encoder:      # [B, P, k * dq] -> [B, P * k, dq]
            q, mask = q.reshape(b, lq * k, self.dq), encoder_mask(pmap, lq, k)
        else:                 # [B, P, k * dkv] -> [B, P * k, dkv]
            kv, mask = kv.reshape(b, kv.shape[1] * k, -1), decoder_mask(pmap, kv.shape[1], k)
        qh = self._heads(self.wq(rms_norm(q, self.q_norm, self.cfg.eps)))
        kvn = rms_norm(kv, self.kv_norm, self.cfg.eps)
        y = masked_attention(qh, self._heads(self.wk(kvn)), self._heads(self.wv(kvn)), mask)
        y = self.wo(y.transpose(1, 2).reshape(b, q.shape[1], self.dq))
        return y.reshape(b, lq, dq_full)
