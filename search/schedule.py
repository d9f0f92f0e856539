"""Learning-rate schedules as functions of progress in [0, 1] through the run's horizon.

The horizon is time or tokens, whichever the run is budgeted by, so a time-budgeted run still
warms up and anneals fully: progress = max(train_seconds / budget, tokens / max_tokens).
"""
from __future__ import annotations

import math

from graphs.recipe import Training


def lr_at(recipe: Training, progress: float) -> float:
    """The learning rate at `progress` (0 = first step, 1 = end of the horizon)."""
    p = min(max(progress, 0.0), 1.0)
    peak, floor = recipe.lr, recipe.lr * recipe.min_lr_ratio
    if recipe.warmup > 0 and p < recipe.warmup:
        return peak * (p / recipe.warmup)
    if recipe.schedule == "constant":
        return peak
    rest = (p - recipe.warmup) / max(1e-12, 1.0 - recipe.warmup)
    if recipe.schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * rest))
    # wsd: warmup, stable at the peak, then a linear decay over the final `cooldown` share
    start = 1.0 - recipe.cooldown
    if p < start:
        return peak
    return peak + (floor - peak) * (p - start) / max(1e-12, recipe.cooldown)
