"""Compilation, kept apart from building so that tests can build without compiling.

`regional`: every layer of a repeat group is compiled with `Module.compile()`; identical layers
share one compiled graph (PyTorch inlines built-in nn.Modules and treats their parameters as
inputs), so a 12-layer stack compiles like one layer. Each run of nodes between groups (the
embeddings; the final norm, head and loss) is compiled as one region, so the loss fuses with the
head as it does in a whole-model compile. `full`: one `torch.compile` of the whole model
(slower to compile, can fuse across node boundaries). `auto` = regional when the graph has repeat
groups, full otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from graphs.build import GraphModel

MODES = ("auto", "regional", "full", "none")


def compile_model(model: GraphModel, mode: str = "auto", **options) -> nn.Module:
    """Compile in place (regional) or wrap (full); returns the module to call."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return model
    groups = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if mode == "full" or (mode == "auto" and not groups):
        return torch.compile(model, **options)
    for group in groups:
        for layer in group:
            layer.compile(**options)
    for i, (kind, _) in enumerate(model.segments()):
        if kind == "steps":
            model.segment_fns[i] = torch.compile(model._run_steps, **options)
    return model
