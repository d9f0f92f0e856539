"""Arithmetic on named variables, parsed by hand (never `eval`).

Grammar: numbers, names, + - * / // % **, comparisons, and/or/not, parentheses and the
functions in FUNCTIONS (`if(c, a, b)` picks). Results are bounded so that a graph cannot ask for
astronomically large numbers or hang the checker.
"""
from __future__ import annotations

import math
import re

from graphs.errors import did_you_mean

MAX_LEN = 500
MAX_ABS = 1e18
_TOKEN = re.compile(r"\s*(?:(\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)"
                    r"|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|==|!=|<=|>=|[-+*/%()<>,]))")


class ExprError(ValueError):
    """A malformed or out-of-range expression."""


def _if(c, a, b):
    return a if c else b


FUNCTIONS = {
    "min": min, "max": max, "abs": abs, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
    "floor": math.floor, "ceil": math.ceil, "round": round, "int": int, "float": float, "if": _if,
}
_KEYWORDS = {"and", "or", "not"}


def tokenize(text: str) -> list[str]:
    if len(text) > MAX_LEN:
        raise ExprError(f"expression longer than {MAX_LEN} characters")
    pos, out = 0, []
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"unexpected character {text[pos:].strip()[:1]!r} at position {pos + 1}")
        out.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return out


def _check(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        raise ExprError("result is not a finite number")
    if abs(v) > MAX_ABS:
        raise ExprError(f"result {v:.3g} is out of range (|x| <= {MAX_ABS:.0e})")
    return v


class _Parser:
    def __init__(self, tokens, env):
        self.t, self.i, self.env = tokens, 0, env
        self.names: set[str] = set()

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None:
            raise ExprError("expression ends too early" + (f"; expected {want!r}" if want else ""))
        if want is not None and tok != want:
            raise ExprError(f"expected {want!r}, found {tok!r}")
        self.i += 1
        return tok

    def parse(self):
        v = self.or_()
        if self.peek() is not None:
            raise ExprError(f"unexpected {self.peek()!r}")
        return v

    def or_(self):
        v = self.and_()
        while self.peek() == "or":
            self.take()
            r = self.and_()
            v = v or r
        return v

    def and_(self):
        v = self.not_()
        while self.peek() == "and":
            self.take()
            r = self.not_()
            v = v and r
        return v

    def not_(self):
        if self.peek() == "not":
            self.take()
            return not self.not_()
        return self.cmp()

    def cmp(self):
        v = self.sum()
        op = self.peek()
        if op in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            r = self.sum()
            return {"==": v == r, "!=": v != r, "<": v < r, "<=": v <= r, ">": v > r, ">=": v >= r}[op]
        return v

    def sum(self):
        v = self.term()
        while self.peek() in ("+", "-"):
            op, r = self.take(), self.term()
            v = _check(v + r if op == "+" else v - r)
        return v

    def term(self):
        v = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op, r = self.take(), self.unary()
            if op != "*" and r == 0:
                raise ExprError("division by zero")
            v = _check({"*": lambda: v * r, "/": lambda: v / r, "//": lambda: v // r,
                        "%": lambda: v % r}[op]())
        return v

    def unary(self):
        if self.peek() in ("-", "+"):
            op = self.take()
            v = self.unary()
            return -v if op == "-" else v
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == "**":
            self.take()
            exp = self.unary()
            if abs(base) > 1 and exp * math.log2(abs(base)) > 64:
                raise ExprError(f"{base} ** {exp} is out of range")
            if base == 0 and exp < 0:
                raise ExprError("division by zero")
            return _check(base ** exp)
        return base

    def atom(self):
        tok = self.take()
        if tok == "(":
            v = self.or_()
            self.take(")")
            return v
        if tok[0].isdigit() or tok[0] == ".":
            return float(tok) if any(c in tok for c in ".eE") else _check(int(tok))
        if tok[0].isalpha() or tok[0] == "_":
            if tok in _KEYWORDS:
                raise ExprError(f"unexpected {tok!r}")
            if self.peek() == "(":
                return self.call(tok)
            if tok in ("true", "True"):
                return True
            if tok in ("false", "False"):
                return False
            if tok not in self.env:
                raise ExprError(f"unknown name '{tok}'{did_you_mean(tok, self.env)}")
            self.names.add(tok)
            return self.env[tok]
        raise ExprError(f"unexpected {tok!r}")

    def call(self, name):
        if name not in FUNCTIONS:
            raise ExprError(f"unknown function '{name}'{did_you_mean(name, FUNCTIONS)}")
        self.take("(")
        args = []
        if self.peek() != ")":
            args.append(self.or_())
            while self.peek() == ",":
                self.take()
                args.append(self.or_())
        self.take(")")
        try:
            return _check(FUNCTIONS[name](*args))
        except (TypeError, ValueError, OverflowError) as e:
            raise ExprError(f"{name}(...): {e}") from None


def evaluate(text: str, env: dict):
    """Evaluate `text` with the variables in `env`; raise ExprError with a readable message."""
    return _Parser(tokenize(text), env).parse()


def names_in(text: str) -> set[str]:
    """The variable names an expression refers to (functions and keywords excluded)."""
    toks = tokenize(text)
    out = set()
    for i, t in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if (t[0].isalpha() or t[0] == "_") and t not in _KEYWORDS and nxt != "(" \
                and t not in ("true", "false", "True", "False"):
            out.add(t)
    return out
