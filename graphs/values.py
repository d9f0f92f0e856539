"""Turns the YAML mapping of a block (or the training section) into its typed Config.

Numbers may be written as expressions over the graph's variables (and `layer` inside a repeat
group), and a boolean or word field may name a variable; each field's type and bounds, declared
by the block, are enforced here.
"""
from __future__ import annotations

import math

from blocks.registry import FieldInfo, config_fields
from graphs.errors import Locator, did_you_mean
from graphs.expr import ExprError, evaluate

NODE_KEYS = ("type", "in")


def _number(f: FieldInfo, v, env, loc: Locator, path):
    if isinstance(v, bool):
        raise loc.error(f"expected {f.type.__name__}, got a boolean", path)
    if isinstance(v, str):
        try:
            v = evaluate(v, env)
        except ExprError as e:
            raise loc.error(f"in expression {v!r}: {e}", path)
        if isinstance(v, bool):
            raise loc.error(f"expected {f.type.__name__}, the expression gave a boolean", path)
    if not isinstance(v, (int, float)):
        raise loc.error(f"expected {f.type.__name__}, got {type(v).__name__}", path)
    if f.type is int:
        if isinstance(v, float):
            if not (math.isfinite(v) and v.is_integer()):
                raise loc.error(f"expected an integer, got {v:g}", path)
            v = int(v)
    else:
        v = float(v)
    if f.min is not None and v < f.min or f.max is not None and v > f.max:
        lo = "-inf" if f.min is None else f"{f.min:g}"
        hi = "inf" if f.max is None else f"{f.max:g}"
        raise loc.error(f"{f.name}={v:g} is out of bounds [{lo}, {hi}]", path)
    return v


def convert(f: FieldInfo, v, env, loc: Locator, path):
    """One field's YAML value -> its typed value, or a located GraphError."""
    if v is None:
        if f.optional:
            return None
        raise loc.error(f"'{f.name}' cannot be null", path)
    if f.type in (int, float):
        return _number(f, v, env, loc, path)
    if isinstance(v, str) and v in env and not f.ref:
        v = env[v]  # a boolean or word field may name a variable (one search knob for many nodes)
    if f.type is bool:
        if not isinstance(v, bool):
            raise loc.error(f"expected true or false (or a variable holding one), got {v!r}", path)
        return v
    if not isinstance(v, str):
        raise loc.error(f"expected a string, got {type(v).__name__}", path)
    if f.choices and v not in f.choices:
        raise loc.error(f"'{v}' is not one of {', '.join(f.choices)}{did_you_mean(v, f.choices)}", path)
    return v


def make_config(config_cls, spec: dict, env: dict, loc: Locator, path, skip=NODE_KEYS):
    """Build `config_cls` from a mapping; unknown or missing fields are located errors."""
    fields = {f.name: f for f in config_fields(config_cls)}
    for key in spec:
        if key not in fields and key not in skip:
            allowed = ", ".join(fields) or "none"
            raise loc.error(f"unknown parameter '{key}'{did_you_mean(key, fields)}; "
                            f"allowed: {allowed}", tuple(path) + (key,))
    values = {}
    for name, f in fields.items():
        if name in spec:
            values[name] = convert(f, spec[name], env, loc, tuple(path) + (name,))
        elif f.required:
            raise loc.error(f"missing required parameter '{name}' ({f.doc})", path)
    return config_cls(**values)
