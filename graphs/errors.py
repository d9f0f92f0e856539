"""Errors a user can act on: every one names the file, line, column and YAML path."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'x'?)' when a close option exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def path_str(path) -> str:
    """('nodes', 'blocks', 'body', 0) -> 'nodes.blocks.body[0]'."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


@dataclass
class Problem:
    """One thing wrong with a graph, located in its file."""

    message: str
    path: tuple = ()
    file: str = "<graph>"
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        return f"{where}: {path_str(self.path)}: {self.message}"


@dataclass
class GraphError(Exception):
    """A graph the user wrote is wrong; carries one or more located problems."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class Locator:
    """Maps YAML paths to (line, column) so that errors can point into the file."""

    def __init__(self, file: str, marks: dict | None = None):
        self.file = file
        self.marks = marks or {}

    def problem(self, message: str, path=()) -> Problem:
        path = tuple(path)
        probe = path
        while probe not in self.marks and probe:
            probe = probe[:-1]
        line, col = self.marks.get(probe, (None, None))
        return Problem(message, path, self.file, line, col)

    def error(self, message: str, path=()) -> GraphError:
        return GraphError([self.problem(message, path)])

    def moved(self, old_prefix: tuple, new_prefix: tuple) -> "Locator":
        """A locator where marks under old_prefix also answer for new_prefix (resolved choices)."""
        marks = dict(self.marks)
        n = len(old_prefix)
        for p, m in self.marks.items():
            if p[:n] == old_prefix:
                marks.setdefault(new_prefix + p[n:], m)
        return Locator(self.file, marks)
