"""Hostile graphs, generated: property-based fuzzing of the loader, checker and resolver.

Every input, random or a mutation of a shipped graph, must end in a valid graph or a clear
error (a `GraphError` naming the file, line and YAML path) within a second and without running
anything it names: never another exception, a hang or code execution. Seeds from
tests/test_malformed.py (billion laughs, `!!python` tags, deep nesting, huge numbers) are among
the mutations.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import GRAPHS
from graphs.check import check_file
from graphs.errors import GraphError

LIMIT_S = 1.0      # for a refusal; a valid graph also gets its full-size cost analysis:
VALID_LIMIT_S = 5.0
EXAMPLES = 60
SHIPPED = {p.name: p.read_text() for p in GRAPHS}
LOCATED = re.compile(r"^.+?(:\d+:\d+)?: .+", re.S)

# Values an attacker or a tired user might type where a scalar stands.
HOSTILE = [
    "0", "-1", "1e309", "-1e309", "nan", ".inf", "99999999999999999999999", "2**64", "1e-400",
    "null", "~", "true", "''", '"\\x00"', "[]", "{}", "[1, [2, [3, [4]]]]", "&a x", "*a", "*nope",
    "!!python/object/apply:os.system ['touch pwned']", "!!python/name:os.system",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14", "{choice: []}",
    "{choice: [gelu, *a]}", "{int: [1, 1e12]}", "{float: [0, 1], log: true}", "d_model * 1e9",
    "n_layer ** n_layer", "(((((((((((1)))))))))))", "d_model / 0", "layer % 0", "'x' * 10",
    "rmsnorm", "no_such_block", "tokens", "stream", "h@-1", "h@999",
]
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _mutate(text: str, ops: list[tuple[int, int, int]]) -> str:
    """Apply line-level edits: (kind, i, j) with i, j picking lines and hostile values."""
    lines = text.splitlines()
    for kind, i, j in ops:
        if not lines:
            break
        n = i % len(lines)
        line = lines[n]
        if kind == 0:                                   # delete a line
            del lines[n]
        elif kind == 1:                                 # duplicate it
            lines.insert(n, line)
        elif kind == 2 and ":" in line:                 # a hostile value after the key
            key = line.split(":", 1)[0]
            lines[n] = f"{key}: {HOSTILE[j % len(HOSTILE)]}"
        elif kind == 3:                                 # break the indentation
            lines[n] = " " * (j % 5) + line.lstrip()
        elif kind == 4:                                 # swap two lines
            m = j % len(lines)
            lines[n], lines[m] = lines[m], line
        elif kind == 5:                                 # cut the file short
            lines = lines[:n]
        elif kind == 6:                                 # prepend alias bombs
            lines = LAUGHS.splitlines() + lines
        elif kind == 7:                                 # deep nesting in place of a value
            key = line.split(":", 1)[0] if ":" in line else "x"
            lines[n] = f"{key}: " + "[" * (200 + j % 800) + "]" * (200 + j % 800)
    return "\n".join(lines) + "\n"


def _check_one(text: str, tmp: Path) -> None:
    path = tmp / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    start, limit = time.perf_counter(), VALID_LIMIT_S
    try:
        for _ in check_file(str(path), None, []):
            pass
    except GraphError as e:
        limit = LIMIT_S
        message = str(e)
        assert e.problems, "a GraphError without a problem"
        assert all(p.file == str(path) for p in e.problems), message
        assert LOCATED.match(message), message
    # any other exception propagates and fails the property: a traceback is a bug of ours
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"took {elapsed:.2f} s on:\n{text[:2000]}"
    assert not (tmp / "pwned").exists() and not Path("pwned").exists()


pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate),   # no shrinking: a failure prints as found
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(name=st.sampled_from(sorted(SHIPPED)),
       ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 10_000), st.integers(0, 10_000)),
                    min_size=1, max_size=4))
def test_mutated_shipped_graphs_end_in_a_graph_or_a_located_error(name, ops, tmp_path):
    _check_one(_mutate(SHIPPED[name], ops), tmp_path)


KEYS = ["name", "vars", "sizes", "nodes", "type", "in", "repeat", "body", "out", "training",
        "tiny", "d_model", "n_layer", "heads", "dim", "vocab", "choice", "int", "float", "tie",
        "lr", "x", "h", "stream", "layer"]
SCALARS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.sampled_from(KEYS + HOSTILE), st.text(max_size=20))
TREES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=30)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(KEYS), TREES, max_size=6))
def test_random_yaml_trees_end_in_a_graph_or_a_located_error(tree, tmp_path):
    _check_one(yaml.safe_dump(tree, allow_unicode=True), tmp_path)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("abn: -[]{}&*!|>'\"#\n\t0123456789.,%@?")), max_size=300))
def test_random_text_ends_in_a_graph_or_a_located_error(text, tmp_path):
    _check_one(text, tmp_path)
