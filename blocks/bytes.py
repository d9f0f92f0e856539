"""Byte-level blocks (Byte Latent Transformer, arXiv 2412.09871): patchers and the maps between
the byte sequence and the patch sequence.

A patcher turns byte ids into a `patch_map` (the patch id of every byte, non-decreasing from
0). `patch_pool` gathers byte states into one vector per patch; `patch_unpool` hands each byte
the state of the *previous* patch, so that no byte sees its own or a later patch (causality).
Entropy patching and the local encoder/decoder with cross-attention build on these kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blocks.kinds import KindError, expect, expect_count, hidden, patch_map
from blocks.registry import Block, param, register


def _bytes_and_map(ins, seq):
    expect_count(ins, 2)
    x = expect(ins, 0, "hidden")
    if x.seq != seq:
        raise KindError(f"input 1 must live on the {seq} sequence, got {x}", 0)
    expect(ins, 1, "patch_map")
    return x


@register
class PatchPool(Block):
    """Byte states -> patch states by mean or max over each patch's bytes."""

    type_name, family = "patch_pool", "bytes"
    example = ({"max_patches": 3}, [hidden(16, "byte"), patch_map()])  # for the registry's smoke test
    inputs = ("bytes_hidden", "patch_map")

    @dataclass(frozen=True)
    class Config:
        max_patches: int = param(doc="patch slots per sequence (upper bound on patches)", min=1,
                                 max=1 << 22)
        reduce: str = param("mean", "how bytes are pooled", choices=("mean", "amax"))

    @classmethod
    def infer(cls, cfg, ins):
        x = _bytes_and_map(ins, "byte")
        return (hidden(x.width, "patch"),)

    def forward(self, x, pmap):
        b, _, d = x.shape
        # bytes of patches past the last slot go to a discarded extra slot: merging them into the
        # last slot would let earlier bytes read later ones through the decoder
        m = self.cfg.max_patches
        idx = pmap.clamp(max=m).unsqueeze(-1).expand(-1, -1, d)
        out = x.new_zeros(b, m + 1, d)
        return out.scatter_reduce(1, idx, x, reduce=self.cfg.reduce, include_self=False)[:, :m]


@register
class PatchUnpool(Block):
    """Patch states -> byte states: a byte in patch p receives patch p - 1 (zeros for p = 0);
    fed a patcher's `next` map, the prediction at byte t receives the patch before its target's."""

    type_name, family = "patch_unpool", "bytes"
    example = ({}, [hidden(16, "patch"), patch_map()])  # for the registry's smoke test
    inputs = ("patch_hidden", "patch_map")

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def infer(cls, cfg, ins):
        x = _bytes_and_map(ins, "patch")
        return (hidden(x.width, "byte"),)

    def forward(self, x, pmap):
        d = x.shape[-1]
        # slot p + 1 of `shifted` is patch p; bytes past the last slot read the last slot
        shifted = torch.cat([x.new_zeros(x.shape[0], 1, d), x], dim=1)
        idx = pmap.clamp(max=x.shape[1]).unsqueeze(-1).expand(-1, -1, d)
        return shifted.gather(1, idx)


# the other BLT families register on import of this module (blocks/__init__ imports `bytes`)
from blocks import blt_cross, blt_hash, blt_patch  # noqa: F401
