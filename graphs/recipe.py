"""The `training:` section: the recipe an architecture needs, as defaults for the trainer."""
from __future__ import annotations

from dataclasses import dataclass

from blocks.registry import param


@dataclass(frozen=True)
class Training:
    """Optimiser and schedule defaults; a run may override any of them with --set training.K=V."""

    optimizer: str = param("adamw", "optimiser", choices=("adamw",))
    lr: float = param(6e-4, "peak learning rate", min=0.0, max=10.0)
    min_lr_ratio: float = param(0.1, "final learning rate as a share of lr", min=0.0, max=1.0)
    beta1: float = param(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = param(0.95, "AdamW beta2", min=0.0, max=1.0)
    eps: float = param(1e-8, "AdamW epsilon", min=0.0, max=1.0)
    weight_decay: float = param(0.1, "decoupled weight decay on matrices", min=0.0, max=10.0)
    schedule: str = param("cosine", "learning-rate schedule after warmup",
                          choices=("cosine", "wsd", "constant"))
    warmup: float = param(0.0, "warmup as a share of the run's horizon", min=0.0, max=1.0)
    cooldown: float = param(0.2, "final decay share for the wsd schedule", min=0.0, max=1.0)
    grad_clip: float = param(1.0, "clip the global gradient norm (0 = off)", min=0.0, max=1e6)
    batch_tokens: int = param(524288, "global batch in tokens (reached by accumulation)",
                              min=1, max=1 << 30)
    micro_batch: int = param(16, "sequences per forward/backward", min=1, max=1 << 16)
