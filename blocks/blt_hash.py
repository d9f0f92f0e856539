"""BLT hash n-gram embeddings (arXiv 2412.09871 §3.2.1).

For n = n_min..n_max, the n-gram ending at byte i is hashed by a polynomial hash
h = sum_{k<n} b_{i-n+1+k} * a^k (oldest byte times a^0, as the reference code and Hugging Face's
`byte_group_hash_function` compute it; int64, wrapping; bytes before the start count as 0),
taken modulo `buckets` (non-negative remainder) and looked up in
its own table of `buckets` rows; the block returns the sum over n (add it to a byte embedding).
Identical n-grams hash identically at any position, because h depends only on the n bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.common import normal_
from blocks.kinds import KindError, byte_ids, expect, expect_count, hidden
from blocks.registry import Block, param, register

PRIME = 1_000_000_007


def _wrap64(v: int) -> int:
    """Python int -> the signed int64 with the same low 64 bits."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def rolling_hash(ids: torch.Tensor, n: int, base: int = PRIME) -> torch.Tensor:
    """int64 [B, N] hash of the n bytes ending at every position (left-padded with zeros)."""
    ids = ids.long()
    h = torch.zeros_like(ids)
    for j in range(n):  # byte i - j times base^(n - 1 - j)
        shifted = F.pad(ids, (j, 0))[:, : ids.shape[1]]
        h = h + shifted * _wrap64(base ** (n - 1 - j))
    return h


def ngram_buckets(ids: torch.Tensor, n: int, buckets: int, base: int = PRIME) -> torch.Tensor:
    """Bucket index in [0, buckets) of the n-gram ending at every byte."""
    return torch.remainder(rolling_hash(ids, n, base), buckets)


@register
class HashNgram(Block):
    """Sum over n = n_min..n_max of a learned table looked up by the n-gram's rolling hash."""

    type_name, family = "hash_ngram", "bytes"
    example = ({"dim": 16, "buckets": 31}, [byte_ids()])  # for the registry's smoke test
    inputs = ("bytes",)
    lookup_table = True

    @dataclass(frozen=True)
    class Config:
        dim: int = param(doc="width of the byte stream", min=1, max=1 << 20)
        buckets: int = param(500002, "rows per n (BLT-1B: 500002)", min=1, max=1 << 26)
        n_min: int = param(3, "shortest n-gram", min=1, max=64)
        n_max: int = param(8, "longest n-gram", min=1, max=64)
        std: float | None = param(None, "init: N(0, std) (default dim ** -0.5)", min=0.0, max=10.0)

    @classmethod
    def check_config(cls, cfg):
        return f"n_min={cfg.n_min} > n_max={cfg.n_max}" if cfg.n_min > cfg.n_max else None

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        ids = expect(ins, 0, "bytes")
        if ids.seq != "byte":
            raise KindError(f"input must live on the byte sequence, got {ids}", 0)
        return (hidden(cfg.dim, "byte"),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.ns = list(range(cfg.n_min, cfg.n_max + 1))
        # one table holds every n (rows [k * buckets, (k + 1) * buckets) for the k-th n)
        self.weight = nn.Parameter(torch.empty(len(self.ns) * cfg.buckets, cfg.dim))

    def init_weights(self, gen):
        normal_(self.weight, self.cfg.std or self.cfg.dim ** -0.5, gen)

    def no_decay(self):
        return {"weight"}

    def forward(self, ids):
        rows = torch.stack([ngram_buckets(ids, n, self.cfg.buckets) + k * self.cfg.buckets
                            for k, n in enumerate(self.ns)], dim=-1)  # [B, N, len(ns)]
        return F.embedding(rows, self.weight).sum(dim=-2)
