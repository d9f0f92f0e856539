"""Compilation, kept apart from building so that tests can build without compiling.

`regional`: every layer of a repeat group is compiled with `Module.compile()`; identical layers
share one compiled graph (PyTorch inlines built-in nn.Modules and treats their parameters as
inputs), so a 12-layer stack compiles like one layer. Each run of nodes between groups (the
embeddings; the final norm, head and loss) is compiled as one region, so the loss fuses with the
head as it does in a whole-model compile. `full`: one `torch.compile` of the whole model
(slower to compile, can fuse across node boundaries). `nested` (experimental): one
`torch.compile` of the whole model with every repeat-group layer marked as a
`torch.compiler.nested_compile_region`, so Dynamo traces a layer once and stamps it out for the
others (hierarchical compilation) while the rest still fuses in one graph. `auto` = regional when
the graph has repeat groups, full otherwise.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from graphs.build import GraphModel, Layer

MODES = ("auto", "regional", "full", "nested", "none")


class NestedLayer(Layer):
    """A Layer whose forward is a nested compile region (see `_nested`)."""


def _nested(model: GraphModel, groups: list, options: dict) -> nn.Module:
    """Mark the layers' class, not each instance: Dynamo reuses a region by its function's code,
    and a marked bound method per instance gave a loss unlike eager's on torch 2.13."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    if region is None:
        raise ValueError(f"compile mode 'nested' needs torch.compiler.nested_compile_region, "
                         f"which torch {torch.__version__} lacks; use another mode or a newer torch")
    if "forward" not in NestedLayer.__dict__:
        # layers whose bodies differ (layer-dependent values) are separate reuse entries, and
        # torch 2.13 raises past max_reuse_entries (default 8); torch 2.11 takes no such argument
        kw = {"max_reuse_entries": 256} if "max_reuse_entries" in inspect.signature(region).parameters else {}
        NestedLayer.forward = region(Layer.forward, **kw)
    for group in groups:
        for layer in group:
            if type(layer) not in (Layer, NestedLayer):  # a subclass would lose its overrides
                raise ValueError(f"compile mode 'nested' expects graph layers, not {type(layer).__name__}")
            layer.__class__ = NestedLayer
    if options.get("backend", "inductor") == "inductor" and "mode" not in options:
        # Inductor's buffer reuse corrupts a reused region's gradients (torch 2.13 on CPU: every
        # layer's but the last wrong, the loss right; not seen on CUDA with 2.11; much like
        # pytorch#192840 / #193960), so it is off for this compile only (torch.compile takes
        # options or a mode, not both)
        options = {**options, "options": {"allow_buffer_reuse": False, **options.get("options", {})}}
    return torch.compile(model, **options)


def _decide_auto_first(model: GraphModel, compiled: nn.Module) -> nn.Module:
    """Nodes with impl auto that run outside the regions decide between Liger and the compiled
    twin on the first call's inputs, eagerly, before that call compiles
    (blocks.liger.decide_compiled)."""
    from blocks import liger
    if not liger.decides_when_compiled(model):
        return compiled

    def first(_, args, kwargs):
        handle.remove()
        liger.decide_compiled(model, *args, **kwargs)
    handle = compiled.register_forward_pre_hook(first, with_kwargs=True)
    return compiled


def _prepare_masks(model: GraphModel, compiled: nn.Module) -> nn.Module:
    """Before every call, eagerly: blocks with a `prepare_masks(t, device)` (attention taking
    Flex) make the block masks for the input's length, which the compiled regions then read
    as inputs instead of building them inside the graph at each call
    (blocks.attention_ops.block_mask). A block whose own length differs (BLT's patches) still
    builds its mask in the graph, as before."""
    users = [m for m in model.modules() if hasattr(m, "prepare_masks")]
    if not users:
        return compiled

    def prepare(_, args, kwargs):
        idx = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(idx, torch.Tensor) and idx.dim() >= 1:
            for m in users:
                m.prepare_masks(idx.shape[-1], idx.device)
    compiled.register_forward_pre_hook(prepare, with_kwargs=True)
    return compiled


def compile_model(model: GraphModel, mode: str = "auto", **options) -> nn.Module:
    """Compile in place (regional) or wrap (full, nested); returns the module to call."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return model
    return _decide_auto_first(model, _prepare_masks(model, _compile(model, mode, options)))


def _compile(model: GraphModel, mode: str, options: dict) -> nn.Module:
    groups = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if mode == "full" or (mode == "auto" and not groups):
        return torch.compile(model, **options)
    if mode == "nested":
        return _nested(model, groups, options)
    allow_entries(regional_entries(model))
    for group in groups:
        for layer in group:
            layer.compile(**options)
    for i, (kind, _) in enumerate(model.segments()):
        if kind == "steps":
            model.segment_fns[i] = torch.compile(model._run_steps, **options)
    return model


def regional_entries(model: GraphModel) -> int:
    """Dynamo cache entries a regional compile of `model` may take: two per layer, for training
    and evaluation (grad on and off; layers whose bodies differ, e.g. a window per layer, each
    trace anew), and four per run of steps (also with and without targets)."""
    layers = sum(len(m) for m in model.children() if isinstance(m, nn.ModuleList))
    steps = sum(kind == "steps" for kind, _ in model.segments())
    return 2 * layers + 4 * steps


def allow_entries(n: int) -> None:
    """Raise Dynamo's per-code recompile limit to at least `n` (never lower it). Every layer of
    every regionally compiled model shares `Layer`'s code and every region `_run_steps`' code,
    and Dynamo counts entries per code object: past the limit (8) it runs the rest eagerly with
    one warning. Seen: a 10-layer graph with a window per layer ran its last layers eagerly, and
    the fifth and sixth graph models compiled in one bench process ran their head and loss eagerly."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, n)
