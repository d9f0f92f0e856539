"""Expressions are parsed by hand: arithmetic as Python would do it, and nothing else."""
from __future__ import annotations

import pytest

from graphs.expr import ExprError, evaluate, names_in

ENV = {"d_model": 768, "n_layer": 12, "n_head": 12, "layer": 3}


@pytest.mark.parametrize("text, want", [
    ("4 * d_model", 3072),
    ("d_model // n_head", 64),
    ("(8 * d_model // 3 + 255) // 256 * 256", 2048),
    ("0.02 / sqrt(2 * n_layer)", 0.02 / (24 ** 0.5)),
    ("-2 ** 2", -4),
    ("2 ** 3 ** 2", 512),
    ("10 % 4 + 7 // 2", 5),
    ("if(layer % 2 == 0, 128, 1024)", 1024),
    ("max(1, min(layer, 2))", 2),
    ("layer >= 3 and not layer > 5", True),
    ("1e-5", 1e-5),
    ("3.0e-4 * 2", 6e-4),
])
def test_evaluates_like_python(text, want):
    assert evaluate(text, ENV) == pytest.approx(want)


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os')", "unexpected character"),
    ("d_model.__class__", "unexpected character"),
    ("open(1)", "unknown function 'open'"),
    ("d_modle * 2", "did you mean 'd_model'"),
    ("1 / 0", "division by zero"),
    ("10 ** 1000", "out of range"),
    ("9" * 30, "out of range"),
    ("(1 + 2", "expected ')'"),
    ("1 +", "ends too early"),
    ("1 2", "unexpected '2'"),
    ("x" * 600, "longer than"),
])
def test_rejects_with_a_reason(text, fragment):
    with pytest.raises(ExprError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        evaluate(text, ENV)


def test_names_in_lists_variables_not_functions():
    assert names_in("sqrt(2 * n_layer) + d_model // if(layer, 1, 2)") == {"n_layer", "d_model", "layer"}
