"""torch.export format: DIR/model.pt2, the built graph's inference program (idx -> logits) with
its weights, for any graph. Batch and sequence length are dynamic, the sequence up to the
trained context (`seq_len`); load it with `torch.export.load(path).module()`, no project code.
torch.export.load uses pickle (its documentation says so): load only .pt2 files you trust; the
standalone and hf formats keep their weights in safetensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from graphs.build import build
from graphs.plan import Plan
from graphs.export import target


class Logits(nn.Module):
    """The model at inference: token ids [B, T] -> logits [B, T, vocab], no targets, no loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]


def program(plan: Plan, state_dict: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The exported program of `plan` with `state_dict`'s weights, in eval mode."""
    model = build(plan, seed=None)  # fp32; the weights come from state_dict, not an init
    model.load_state_dict(state_dict, strict=True)
    wrapped = Logits(model).eval()
    t = plan.seq_len
    # traced at T = seq_len, batch 2: neither size is 0 or 1, which export would specialise on
    example = torch.zeros(2, t, dtype=torch.long)
    dims = {"idx": {0: Dim("batch", min=1), 1: Dim("seq", min=1, max=t)}}
    return torch.export.export(wrapped, (example,), dynamic_shapes=dims)


def write(plan: Plan, state_dict: dict[str, torch.Tensor], out_dir: Path, meta: dict) -> list[Path]:
    """DIR/model.pt2 (torch.export.save)."""
    path = target(Path(out_dir), "model.pt2")
    torch.export.save(program(plan, state_dict), path)
    return [path]
