"""Held-out evaluation: mean loss per target and bits per byte over one fixed byte span.

bpb = sum of target NLL in nats / (ln 2 * UTF-8 bytes of the span). Every tokenizer is scored on
the same documents, so BPE and byte-level models share one scale (never divide by tokens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, val, autocast) -> dict[str, float]:
    """`val` iterates (x, y) batches, y = -1 where nothing is scored, and has `.span_bytes`."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for x, y in val:
            with autocast():
                logits, _ = model(x)
            lp = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 ignore_index=-1, reduction="sum")
            nll += lp.double().cpu()
            count += int((y >= 0).sum())
    finally:
        model.train(was_training)
    total = float(nll)
    return {"val/loss": total / max(count, 1),
            "val/bpb": total / (math.log(2) * max(val.span_bytes, 1))}
