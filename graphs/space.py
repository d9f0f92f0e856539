"""Search-space markers: where a value or a block type may vary.

    {choice: [a, b, ...]}                       categorical (first option is the default)
    {int: [lo, hi], step: 1, log: false, default: x}
    {float: [lo, hi], step: null, log: false, default: x}

A choice may offer whole mappings (e.g. two MLP configurations); markers inside an option are
conditional on that option being chosen and are named `path[label]....`. A graph with markers is
a family; `resolve` picks one concrete graph from {name: value}.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from graphs.errors import GraphError, Locator, did_you_mean

MARKER_KEYS = ("choice", "int", "float")
MARKER_FIELDS = set(MARKER_KEYS) | {"step", "log", "default"}


def is_marker(v) -> bool:
    return isinstance(v, dict) and sum(k in v for k in MARKER_KEYS) == 1


@dataclass(frozen=True)
class Dim:
    """One dimension of a graph's search space."""

    name: str                         # e.g. "vars.d_model", "nodes.blocks.body.mlp[swiglu].hidden"
    kind: str                         # choice | int | float
    choices: tuple = ()               # values (or option labels for mapping options)
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    default: object = None
    parent: tuple | None = None       # (name, label) of the choice this dim depends on
    path: tuple = ()                  # where the marker stands in the file

    def describe(self) -> str:
        if self.kind == "choice":
            body = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            body = f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + \
                   (f" step {self.step:g}" if self.step else "")
        cond = f" if {self.parent[0]} = {self.parent[1]}" if self.parent else ""
        return f"{self.kind} {body} default {self.default}{cond}"

    def contains(self, v) -> bool:
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices) or v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and not float(v).is_integer():
            return False
        return self.low - 1e-12 <= v <= self.high + 1e-12


def name_of(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, Label):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + p
    return out


class Label(str):
    """A choice-option label inside a dim name (printed as [label])."""


def _labels(options: list) -> list:
    if not any(isinstance(o, (dict, list)) for o in options):
        return list(options)
    names = [o.get("type") if isinstance(o, dict) and isinstance(o.get("type"), str) else None
             for o in options]
    unique = len(set(names)) == len(names) and None not in names
    return [names[i] if unique else f"option{i}" for i in range(len(options))]


def _check_marker(m: dict, path, loc: Locator) -> None:
    bad = [k for k in m if k not in MARKER_FIELDS]
    if bad:
        raise loc.error(f"unknown marker key '{bad[0]}'{did_you_mean(bad[0], MARKER_FIELDS)}; "
                        "a marker has one of choice/int/float plus step, log, default", path)
    if "choice" in m:
        opts = m["choice"]
        if not isinstance(opts, list) or not opts:
            raise loc.error("choice needs a non-empty list of options", path + ("choice",))
        if any(k in m for k in ("step", "log")):
            raise loc.error("step and log apply to int and float ranges, not to choice", path)
        if "default" in m and m["default"] not in _labels(opts):
            raise loc.error(f"default {m['default']!r} is not one of the options", path + ("default",))
        return
    kind = "int" if "int" in m else "float"
    rng = m[kind]
    num = (int,) if kind == "int" else (int, float)
    if not (isinstance(rng, list) and len(rng) == 2 and
            all(isinstance(x, num) and not isinstance(x, bool) for x in rng)):
        raise loc.error(f"{kind} needs [low, high] with {kind} bounds, got {rng!r}", path + (kind,))
    lo, hi = rng
    if lo > hi:
        raise loc.error(f"low {lo} is above high {hi}", path + (kind,))
    if m.get("log") and lo <= 0:
        raise loc.error("a log-scale range needs low > 0", path + (kind,))
    step = m.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, num) or step <= 0):
        raise loc.error(f"step must be a positive {kind}", path + ("step",))
    if step is not None and m.get("log"):
        raise loc.error("step and log cannot be combined", path)
    if "default" not in m:
        raise loc.error(f"a {kind} range needs a default (the baseline value)", path)
    d = m["default"]
    if isinstance(d, bool) or not isinstance(d, num) or not lo <= d <= hi:
        raise loc.error(f"default {d!r} is not a {kind} within [{lo}, {hi}]", path + ("default",))


def find(obj, path: tuple, loc: Locator, parent=None, name_path: tuple = ()) -> list[Dim]:
    """All markers in `obj` (data at `path`), depth first, with conditional children."""
    name_path = name_path or path
    if is_marker(obj):
        _check_marker(obj, path, loc)
        name = name_of(name_path)
        if "choice" in obj:
            opts = obj["choice"]
            labels = _labels(opts)
            dims = [Dim(name, "choice", tuple(labels), default=obj.get("default", labels[0]),
                        parent=parent, path=path)]
            for i, (opt, label) in enumerate(zip(opts, labels)):
                if isinstance(opt, (dict, list)):
                    dims += find(opt, path + ("choice", i), loc, (name, label),
                                 name_path + (Label(label),))
            return dims
        kind = "int" if "int" in obj else "float"
        lo, hi = obj[kind]
        return [Dim(name, kind, low=lo, high=hi, step=obj.get("step"), log=bool(obj.get("log")),
                    default=obj["default"], parent=parent, path=path)]
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if path == () and k == "sizes":  # already applied to vars
                continue
            out += find(v, path + (k,), loc, parent, name_path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += find(v, path + (i,), loc, parent, name_path + (i,))
    return out


def resolve_data(data: dict, loc: Locator, params: dict, dims: list[Dim]):
    """Replace every marker by its value (params, else default); returns (data, locator)."""
    known = {d.name: d for d in dims}
    for k in params:
        if k not in known:
            raise GraphError([loc.problem(f"unknown search parameter '{k}'{did_you_mean(k, known)}")])
    out = copy.deepcopy(data)
    state = {"loc": loc}

    def pick(obj, path, name_path):
        if is_marker(obj):
            name = name_of(name_path)
            dim = known[name]
            value = params.get(name, dim.default)
            if not dim.contains(value):
                raise state["loc"].error(f"{value!r} is outside the space of {name}: "
                                         f"{dim.describe()}", path)
            if dim.kind == "int":
                return int(value)
            if dim.kind == "float":
                return float(value)
            i = list(dim.choices).index(value)
            option = obj["choice"][i]
            if isinstance(option, (dict, list)):
                state["loc"] = state["loc"].moved(path + ("choice", i), path)
                return pick(option, path, name_path + (Label(value),))
            return option
        if isinstance(obj, dict):
            return {k: v if path == () and k == "sizes" else pick(v, path + (k,), name_path + (k,))
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [pick(v, path + (i,), name_path + (i,)) for i, v in enumerate(obj)]
        return obj

    out = pick(out, (), ())
    return out, state["loc"]


def grid_size(dims: list[Dim]) -> float:
    """Number of concrete graphs when every range is discrete (inf for continuous floats)."""
    total = 1.0
    for d in dims:
        if d.kind == "choice":
            total *= len(d.choices)
        elif d.kind == "int":
            total *= (d.high - d.low) // (d.step or 1) + 1
        elif d.step:
            total *= math.floor((d.high - d.low) / d.step) + 1
        else:
            return math.inf
    return total
