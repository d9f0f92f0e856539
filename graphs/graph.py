"""A loaded graph file: its data after a size and --set overrides, its search space, resolution."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from graphs.errors import GraphError, Locator, did_you_mean
from graphs.space import Dim, find, resolve_data
from graphs.yamlsrc import load_file, load_text


@dataclass
class Graph:
    """A graph document (possibly a family with markers) and where its values stand in the file."""

    data: dict
    loc: Locator
    size: str = "default"

    @property
    def name(self) -> str:
        return self.data.get("name", "?")

    @property
    def file(self) -> str:
        return self.loc.file

    def space(self) -> list[Dim]:
        """The dimensions of the search space, in file order."""
        return find(self.data, (), self.loc)

    def resolve(self, params: dict | None = None) -> "Graph":
        """One concrete graph: every marker replaced by params[name] or its default."""
        data, loc = resolve_data(self.data, self.loc, params or {}, self.space())
        return Graph(data, loc, self.size)

    @property
    def concrete(self) -> bool:
        return not self.space()


def parse_set(item: str, loc: Locator) -> tuple[list, object]:
    """'d_model=512' or 'training.lr=3e-4' -> (path, value); the value is read as YAML."""
    if "=" not in item:
        raise loc.error(f"--set expects KEY=VALUE, got {item!r}")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads '3e-4' as a string; take it as a number when it is one
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, value


def apply_size(data: dict, size: str | None, loc: Locator) -> tuple[dict, str]:
    sizes = data.get("sizes") or {}
    if size is None or size == "default":
        return data, "default"
    if size not in sizes:
        raise loc.error(f"unknown size '{size}'{did_you_mean(size, sizes)}; this graph has: "
                        f"{', '.join(sizes) or 'none'}", ("sizes",))
    out = copy.deepcopy(data)
    for k, v in (sizes[size] or {}).items():
        if k not in out.get("vars", {}):
            raise loc.error(f"size '{size}' sets '{k}', which is not a variable"
                            f"{did_you_mean(k, out.get('vars', {}))}", ("sizes", size, k))
        out["vars"][k] = v
    return out, size


def apply_sets(data: dict, sets, loc: Locator) -> dict:
    out = copy.deepcopy(data)
    for item in sets or ():
        path, value = parse_set(item, loc)
        if len(path) == 1 and path[0] in out.get("vars", {}):
            path = ["vars"] + path
        elif len(path) == 1:
            raise loc.error(f"--set {item}: '{path[0]}' is not a variable"
                            f"{did_you_mean(path[0], out.get('vars', {}))}; use a dotted path "
                            "such as training.lr or nodes.head.bias", ("vars",))
        node = out
        for i, p in enumerate(path[:-1]):
            ok = isinstance(node, dict) and p in node or isinstance(node, list) and \
                isinstance(p, int) and p < len(node)
            if not ok:
                raise loc.error(f"--set {item}: no '{p}' at {'.'.join(map(str, path[:i])) or 'top'}")
            node = node[p]
        if not isinstance(node, (dict, list)):
            raise loc.error(f"--set {item}: {'.'.join(map(str, path[:-1]))} is not a mapping")
        node[path[-1]] = value
    return out


def from_data(data: dict, loc: Locator, size: str | None = None, sets=()) -> Graph:
    """Validate structure (JSON Schema), then apply a size and overrides; re-validate."""
    from graphs.schema import validate

    validate(data, loc)
    sized, size_name = apply_size(data, size, loc)
    if sets:
        sized = apply_sets(sized, sets, loc)
        validate(sized, loc)
    return Graph(sized, loc, size_name)


def load(path: str | Path, size: str | None = None, sets=()) -> Graph:
    """Read, validate and size a graph file. Raises GraphError (located) on any problem."""
    data, loc = load_file(path)
    return from_data(data, loc, size, sets)


def loads(text: str, size: str | None = None, sets=(), file: str = "<string>") -> Graph:
    data, loc = load_text(text, file)
    return from_data(data, loc, size, sets)


__all__ = ["Graph", "GraphError", "load", "loads"]
