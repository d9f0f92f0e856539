"""The closed block registry: short YAML names -> Block classes with typed configs.

A graph can only name blocks registered here, so loading a stranger's graph never runs
arbitrary code. Each block declares a frozen-dataclass Config whose fields carry a doc string
and bounds (`param(...)`); the JSON Schema, the docs and the smoke tests are derived from it.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

from torch import nn

from blocks.kinds import Kind

REGISTRY: dict[str, type["Block"]] = {}


def param(default=MISSING, doc: str = "", *, min=None, max=None, choices=None, ref: bool = False):
    """A config field with its documentation and bounds (min/max inclusive)."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "ref": ref}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type: type            # int, float, bool or str
    default: Any          # MISSING when required
    doc: str
    min: Any = None
    max: Any = None
    choices: tuple | None = None
    ref: bool = False     # the value names another node (e.g. weight tying)
    optional: bool = False

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _base_type(tp) -> tuple[type, bool]:
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def config_fields(config_cls) -> list[FieldInfo]:
    return list(_config_fields(config_cls))


@functools.cache  # get_type_hints is slow, and elaboration asks once per node per layer
def _config_fields(config_cls) -> tuple[FieldInfo, ...]:
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        tp, optional = _base_type(hints[f.name])
        m = f.metadata
        out.append(FieldInfo(f.name, tp, f.default, m.get("doc", ""), m.get("min"), m.get("max"),
                             tuple(m["choices"]) if m.get("choices") else None, m.get("ref", False),
                             optional))
    return tuple(out)


@dataclass(frozen=True)
class Context:
    """What a block may know about where it stands in the graph."""

    node: str                       # node id, e.g. "attn"
    layer: int | None = None        # index inside a repeat group
    n_layer: int | None = None      # repeat count of the enclosing group
    seq_len: int = 1024             # the graph's context length (tokens or bytes)


class Block(nn.Module):
    """Base class of every registered block.

    Subclasses set `type_name`, `family`, a frozen dataclass `Config`, `inputs` (port names,
    for docs), `outputs` (first is the default), implement `infer` (input kinds -> output
    kinds) and `forward`, and may override `init_weights`, `no_decay` and `after_step`, and
    declare `recipe_rules` that the graph's `training:` section must honour.
    """

    type_name: ClassVar[str]
    family: ClassVar[str]
    Config: ClassVar[type]
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("out",)
    has_after_step: ClassVar[bool] = False
    lookup_table: ClassVar[bool] = False  # `weight` is looked up by id (not counted as compute)
    recipe_rules: ClassVar[dict] = {}   # training-recipe values the block needs, e.g. {"warmup": 0.0}
    example: ClassVar[tuple[dict, list[Kind]]]   # (params, input kinds) for the smoke test

    def __init__(self, cfg, ins: list[Kind], ctx: Context):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def infer(cls, cfg, ins: list[Kind]) -> tuple[Kind, ...]:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> str | None:
        """A message when fields are inconsistent with each other (bounds are checked already)."""
        return None

    def init_weights(self, gen) -> None:
        """Initialise parameters from the torch.Generator `gen` (deterministic per seed)."""

    def bind(self, name: str, other: "Block") -> None:
        """Receive the block a `ref` field names (e.g. the embedding an LM head is tied to)."""
        raise NotImplementedError

    def no_decay(self) -> set[str]:
        """Names of own parameters that get no weight decay (default: those with < 2 dims)."""
        return {n for n, p in self.named_parameters(recurse=True) if p.dim() < 2}

    def after_step(self) -> None:
        """Called after every optimizer step when `has_after_step` is True (e.g. renormalise)."""

    @classmethod
    def after_step_all(cls, blocks: list["Block"]) -> None:
        """The after-step hooks of all of a model's blocks that share this method, at once
        (the model calls this; a family overrides it to batch its work, e.g. one compiled
        kernel launch sequence instead of one eager op per tensor)."""
        for block in blocks:
            block.after_step()


def register(cls):
    """Class decorator: add a Block subclass to the registry under its `type_name`."""
    name = cls.type_name
    if name in REGISTRY:
        raise RuntimeError(f"block type {name!r} registered twice")
    if not dataclasses.is_dataclass(cls.Config) or not cls.Config.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}.Config must be a frozen dataclass")
    REGISTRY[name] = cls
    return cls


def get(name: str) -> type[Block]:
    return REGISTRY[name]
