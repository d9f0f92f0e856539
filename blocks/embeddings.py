"""Input embeddings: token (or byte) ids -> residual stream, and learned positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.common import normal_
from blocks.kinds import KindError, expect_count, hidden, tokens
from blocks.registry import Block, param, register

MAX_VOCAB = 1 << 24
MAX_DIM = 1 << 20


def _ids(ins):
    expect_count(ins, 1)
    if ins[0].name not in ("tokens", "bytes"):
        raise KindError(f"input must be token or byte ids, got {ins[0]}", 0)
    return ins[0]


@register
class Embedding(Block):
    """A learned table of `vocab` rows of width `dim`, looked up by id."""

    type_name, family = "embedding", "embeddings"
    example = ({"vocab": 50, "dim": 16}, [tokens(50)])  # for the registry's smoke test
    inputs = ("ids",)
    lookup_table = True

    @dataclass(frozen=True)
    class Config:
        vocab: int = param(doc="rows in the table (>= the ids' vocabulary)", min=1, max=MAX_VOCAB)
        dim: int = param(doc="width of the residual stream", min=1, max=MAX_DIM)
        std: float = param(0.02, "init: N(0, std)", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        ids = _ids(ins)
        if ids.vocab is not None and ids.vocab > cfg.vocab:
            raise KindError(f"the ids range over {ids.vocab} values but the table has only "
                            f"vocab={cfg.vocab} rows", 0)
        return (hidden(cfg.dim, ids.seq),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.weight = nn.Parameter(torch.empty(cfg.vocab, cfg.dim))

    def init_weights(self, gen):
        normal_(self.weight, self.cfg.std, gen)

    def no_decay(self):
        return {"weight"}

    def forward(self, idx):
        return F.embedding(idx, self.weight)


@register
class PositionEmbedding(Block):
    """Learned absolute positions (GPT-2's wpe): position t -> row t, broadcast over the batch."""

    type_name, family = "position_embedding", "embeddings"
    example = ({"max_seq": 8, "dim": 16}, [tokens(50)])  # for the registry's smoke test
    inputs = ("ids",)
    lookup_table = True

    @dataclass(frozen=True)
    class Config:
        max_seq: int = param(doc="number of positions (the context length)", min=1, max=1 << 22)
        dim: int = param(doc="width of the residual stream", min=1, max=MAX_DIM)
        std: float = param(0.02, "init: N(0, std)", min=0.0, max=10.0)

    @classmethod
    def infer(cls, cfg, ins):
        return (hidden(cfg.dim, _ids(ins).seq),)

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self.weight = nn.Parameter(torch.empty(cfg.max_seq, cfg.dim))

    def init_weights(self, gen):
        normal_(self.weight, self.cfg.std, gen)

    def no_decay(self):
        return {"weight"}

    def forward(self, idx):
        b, t = idx.shape
        return self.weight[:t].unsqueeze(0).expand(b, t, -1)
