"""JSON Schema (Draft 2020-12) of the graph format, generated from the block registry.

Stage one of checking: structure only (keys, types, block parameters and their bounds where
they are literal). Meaning (edges, kinds, shapes, sizes) is stage two, in `graphs.elaborate`.
`python -m graphs.docs` writes this schema to graphs/schema.json for editors.
"""
from __future__ import annotations

import functools

import jsonschema

import blocks
from blocks.registry import FieldInfo, config_fields
from graphs.errors import GraphError, Locator, did_you_mean
from graphs.recipe import Training

ID = r"^[A-Za-z_][A-Za-z0-9_]*$"
REF = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?(@.+)?$"
EXPR = {"$ref": "#/$defs/expr"}
MARKER = {"$ref": "#/$defs/marker"}
VAR = {"type": "string", "pattern": ID, "description": "the name of a variable"}


def _field(f: FieldInfo) -> dict:
    if f.ref:
        base = [{"type": "string", "pattern": ID}]
    elif f.type is bool:
        base = [{"type": "boolean"}, VAR]
    elif f.type in (int, float):
        num = {"type": "integer" if f.type is int else "number"}
        if f.min is not None:
            num["minimum"] = f.min
        if f.max is not None:
            num["maximum"] = f.max
        base = [num, EXPR]
    elif f.choices:
        base = [{"enum": list(f.choices)}, VAR]
    else:
        base = [{"type": "string"}]
    if f.optional:
        base.append({"type": "null"})
    out = {"anyOf": base + [MARKER], "description": f.doc}
    if not f.required:
        out["default"] = f.default
    return out


def _config(cls, extra: dict | None = None) -> dict:
    fields = config_fields(cls)
    props = dict(extra or {})
    props.update({f.name: _field(f) for f in fields})
    out = {"type": "object", "properties": props, "additionalProperties": False}
    required = [f.name for f in fields if f.required]
    if required:
        out["required"] = required
    return out


def _node() -> dict:
    types = sorted(blocks.REGISTRY)
    ref_list = {"anyOf": [{"type": "string", "pattern": REF},
                          {"type": "array", "items": {"type": "string", "pattern": REF}, "minItems": 1}]}
    branches = []
    for name in types:
        cls = blocks.REGISTRY[name]
        then = _config(cls.Config, {"type": {}, "in": {}})
        then["required"] = ["type", "in"] + then.get("required", [])
        branches.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                         "then": then})
    return {
        "type": "object",
        "required": ["type", "in"],
        "properties": {"type": {"anyOf": [{"enum": types}, MARKER],
                                "description": "a registered block type"},
                       "in": ref_list},
        "allOf": branches,
    }


def _group() -> dict:
    return {
        "type": "object",
        "required": ["repeat", "in", "body"],
        "properties": {
            "repeat": {"anyOf": [{"type": "integer", "minimum": 1}, EXPR, MARKER],
                       "description": "number of layers; `layer` (0-based) is visible inside"},
            "in": {"type": "string", "pattern": REF},
            "out": {"type": "string", "pattern": ID,
                    "description": "body node whose output carries to the next layer (default: the last)"},
            "body": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": ID},
                     "additionalProperties": {"$ref": "#/$defs/entry"}},
        },
        "additionalProperties": False,
    }


@functools.cache
def schema() -> dict:
    value = {"anyOf": [{"type": "number"}, {"type": "boolean"}, EXPR, MARKER]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.invalid/playground/graph.schema.json",
        "title": "Model graph",
        "type": "object",
        "required": ["name", "vars", "sizes", "nodes", "outputs"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"},   # never ".", ".." or hidden
            "description": {"type": "string"},
            "input": {"enum": ["tokens", "bytes"], "default": "tokens"},
            "vars": {"type": "object", "propertyNames": {"pattern": ID},
                     "required": ["vocab_size", "seq_len"], "additionalProperties": value},
            "sizes": {"type": "object", "required": ["tiny"], "propertyNames": {"pattern": r"^[A-Za-z0-9_.-]+$"},
                      "additionalProperties": {"type": ["object", "null"],
                                               "propertyNames": {"pattern": ID},
                                               "additionalProperties": value}},
            "nodes": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": ID},
                      "additionalProperties": {"$ref": "#/$defs/entry"}},
            "outputs": {"type": "object", "required": ["logits", "loss"], "additionalProperties": False,
                        "properties": {"logits": {"type": "string", "pattern": REF},
                                       "loss": {"type": "string", "pattern": REF}}},
            "training": _config(Training),
        },
        "$defs": {
            "expr": {"type": "string", "minLength": 1, "maxLength": 500,
                     "description": "arithmetic over variables, e.g. '4 * d_model'"},
            "marker": {
                "type": "object",
                "properties": {"choice": {"type": "array", "minItems": 1},
                               "int": {"type": "array", "items": {"type": "integer"},
                                       "minItems": 2, "maxItems": 2},
                               "float": {"type": "array", "items": {"type": "number"},
                                         "minItems": 2, "maxItems": 2},
                               "step": {"type": ["number", "null"]}, "log": {"type": "boolean"},
                               "default": {}},
                "oneOf": [{"required": ["choice"]}, {"required": ["int"]}, {"required": ["float"]}],
                "additionalProperties": False,
            },
            "node": _node(),
            "group": _group(),
            "entry": {"if": {"type": "object", "required": ["repeat"]},
                      "then": {"$ref": "#/$defs/group"},
                      "else": {"if": {"type": "object", "required": ["choice"]},
                               "then": MARKER, "else": {"$ref": "#/$defs/node"}}},
        },
    }


@functools.cache
def _validator():
    return jsonschema.Draft202012Validator(schema())


def _fits(err) -> bool:
    """Whether the value has the type that the failing (sub)schema asks for."""
    want = err.schema.get("type") if isinstance(err.schema, dict) else None
    if want is None:
        return True
    return any(_validator().is_type(err.instance, t) for t in ([want] if isinstance(want, str) else want))


def _leaf(err):
    """Descend anyOf/oneOf contexts to the most specific error: from a branch whose type the value
    has (so `lr: 50` reports the bound, not 'expected string' from the expression branch), then
    the deepest, then not a bare anyOf/oneOf; ties go to the first branch.

    (`best_match` picks the *least* fitting branch here: on a list of siblings it maximises its
    relevance key, whose last term favours errors that do not match the value's type.)"""
    def rank(e):
        return (not _fits(e), -len(e.path), e.validator in ("anyOf", "oneOf"))

    while err.context:
        err = min(err.context, key=rank)
    return err


def _message(err) -> tuple[str, tuple]:
    path = tuple(err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed]
        k = extra[0] if extra else "?"
        hint = did_you_mean(k, allowed)
        where = "parameter" if path and path[0] == "nodes" else "key"
        return f"unknown {where} '{k}'{hint}; allowed: {', '.join(allowed)}", path + (k,)
    if v == "required":
        return f"missing required {err.message.split(' is a required')[0]}", path
    if v == "enum":
        opts = err.validator_value
        hint = did_you_mean(err.instance, opts)
        shown = ", ".join(map(str, opts[:12])) + (", ..." if len(opts) > 12 else "")
        return f"{err.instance!r} is not one of: {shown}{hint}", path
    if v == "pattern":
        return f"{err.instance!r} is not a valid name or reference (letters, digits, _)", path
    if v == "type":
        want = err.validator_value
        return f"expected {want if isinstance(want, str) else ' or '.join(want)}, got " \
               f"{type(err.instance).__name__} {err.instance!r}"[:300], path
    if v in ("minimum", "maximum"):
        return f"{err.instance} is out of bounds ({v} {err.validator_value})", path
    return err.message[:300], path


def validate(data: dict, loc: Locator) -> None:
    """Raise a located GraphError listing up to 10 structural problems."""
    errors = list(_validator().iter_errors(data))
    if not errors:
        return
    problems = []
    seen = set()
    for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        msg, path = _message(_leaf(err))
        if (msg, path) not in seen:
            seen.add((msg, path))
            problems.append(loc.problem(msg, path))
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    raise GraphError(problems[:10])
