"""Reads a graph file safely: plain YAML data only, with the line of every value kept.

Only the standard scalar, mapping and sequence tags are accepted (never `!!python/...`),
aliases cannot blow up (the node count is bounded), nesting is bounded (MAX_DEPTH, checked while
composing, so a deeply nested file is refused at its line rather than exhausting the stack),
duplicate keys are errors rather than silently overwritten, and files above MAX_BYTES are refused
before parsing. A mapping entry is located at its key, a list item at the item.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from graphs.errors import GraphError, Locator, Problem

MAX_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64
_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq")
}


# Where problems with the file as a whole (empty, too large) are reported: line 1, column 1.
_START = yaml.Mark("", 0, 0, 0, None, None)


def _fail(file: str, message: str, mark=None) -> GraphError:
    line = mark.line + 1 if mark is not None else None
    col = mark.column + 1 if mark is not None else None
    return GraphError([Problem(message, (), file, line, col)])


class _TooDeep(yaml.YAMLError):
    def __init__(self, mark):
        super().__init__()
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting at its line: the composer instead of recursing until
    Python's stack runs out, and the scanner for [ and { (whose look-ahead for simple keys is
    quadratic in the number of open brackets) as soon as they nest too deep."""

    _depth = 0

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            raise _TooDeep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Walker:
    def __init__(self, file: str):
        self.file = file
        self.marks: dict[tuple, tuple[int, int]] = {}
        self.count = 0
        self.constructor = yaml.SafeLoader("")

    def value(self, node, path: tuple, depth: int = 0):
        self.count += 1
        if self.count > MAX_NODES:
            raise _fail(self.file, f"more than {MAX_NODES} YAML values (alias expansion?); "
                        "a graph is expected to be small", node.start_mark)
        if depth > MAX_DEPTH:
            raise _fail(self.file, f"nesting deeper than {MAX_DEPTH} levels", node.start_mark)
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if node.tag not in _TAGS:
            raise _fail(self.file, f"YAML tag '{node.tag}' is not allowed; a graph holds only "
                        "plain numbers, strings, lists and mappings", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, val_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _TAGS:
                    raise _fail(self.file, "mapping keys must be plain scalars", key_node.start_mark)
                key = self.constructor.construct_object(key_node)
                if isinstance(key, (list, dict)) or key is None:
                    raise _fail(self.file, "mapping keys must be plain scalars", key_node.start_mark)
                key = str(key) if not isinstance(key, bool) else str(key).lower()
                if key in out:
                    raise _fail(self.file, f"duplicate key '{key}'", key_node.start_mark)
                self.marks.setdefault(path + (key,), (key_node.start_mark.line + 1,
                                                      key_node.start_mark.column + 1))
                out[key] = self.value(val_node, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node)
        except yaml.YAMLError as e:
            raise _fail(self.file, f"cannot read value: {getattr(e, 'problem', e)}", node.start_mark)


def load_text(text: str | bytes, file: str = "<graph>"):
    """Parse YAML text into plain data and a Locator; raise GraphError on anything unsafe."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise _fail(file, f"file is {len(text):,} bytes; graph files are limited to {MAX_BYTES:,}",
                        _START)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[: e.start].count(b"\n") + 1
            raise GraphError([Problem(f"not valid UTF-8 (byte {e.start}: {e.reason}); graph files "
                                      "must be UTF-8 text", (), file, line, 1)])
    if len(text) > MAX_BYTES:
        raise _fail(file, f"file is {len(text):,} characters; graph files are limited to {MAX_BYTES:,}",
                    _START)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as e:
        raise _fail(file, f"nesting deeper than {MAX_DEPTH} levels", e.mark)
    except yaml.MarkedYAMLError as e:
        msg = " ".join(x for x in (e.context, e.problem) if x) or "invalid YAML"
        raise _fail(file, f"YAML syntax error: {msg}", e.problem_mark or e.context_mark or _START)
    except yaml.reader.ReaderError as e:  # a control character: located by its position
        before = text[: e.position]
        line, col = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise GraphError([Problem(f"YAML syntax error: character {char!r} is not allowed "
                                  f"({e.reason})", (), file, line, col)])
    except yaml.YAMLError as e:
        raise _fail(file, f"YAML error: {e}", _START)
    except RecursionError:
        raise _fail(file, "YAML nesting is too deep", _START)
    if root is None:
        raise _fail(file, "the file is empty; a graph needs at least name, vars, sizes, nodes and outputs",
                    _START)
    walker = _Walker(file)
    try:
        data = walker.value(root, ())
    except RecursionError:
        raise _fail(file, "YAML nesting is too deep", _START)
    if not isinstance(data, dict):
        raise _fail(file, f"a graph file must be a mapping at the top level, not a {type(data).__name__}",
                    root.start_mark)
    return data, Locator(file, walker.marks)


def load_file(path: str | Path):
    """Read a graph file from disk (size checked before reading all of it)."""
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise _fail(name, f"file is {size:,} bytes; graph files are limited to {MAX_BYTES:,}", _START)
        raw = path.read_bytes()
    except OSError as e:
        raise _fail(name, f"cannot read the file: {e.strerror or e}")
    return load_text(raw, name)
