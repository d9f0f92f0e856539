"""Edge kinds: what flows along a graph edge, checked before anything is built.

A kind names the value (token ids, a residual stream of width d, n parallel streams, a byte
sequence, a patch sequence with its byte->patch map, logits, a loss) and the sequence level it
lives on (token, byte or patch), so that mixing levels is caught by the checker.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

SEQS = ("token", "byte", "patch")


@dataclass(frozen=True)
class Kind:
    name: str                 # tokens | bytes | hidden | streams | patch_map | logits | loss
    seq: str | None = None    # token | byte | patch (None for a scalar loss)
    width: int | None = None  # d for hidden/streams
    n: int | None = None      # number of parallel streams (pieces: streams x fractions)
    vocab: int | None = None  # for ids and logits
    frac: int | None = None   # streams: fractions each stream's width is split into (None = 1)

    def __str__(self) -> str:
        attrs = [f"{k}={v}" for k, v in (("seq", self.seq), ("d", self.width), ("n", self.n),
                                          ("vocab", self.vocab), ("frac", self.frac))
                 if v is not None]
        return f"{self.name}[{', '.join(attrs)}]" if attrs else self.name

    def with_(self, **kw) -> "Kind":
        return replace(self, **kw)


def tokens(vocab: int) -> Kind:
    return Kind("tokens", "token", vocab=vocab)


def byte_ids(vocab: int = 260) -> Kind:
    return Kind("bytes", "byte", vocab=vocab)


def hidden(width: int, seq: str = "token") -> Kind:
    return Kind("hidden", seq, width=width)


def streams(n: int, width: int, seq: str = "token", frac: int = 1) -> Kind:
    """n pieces of width `width`; with frac m > 1 they are n/m streams each split into m
    fractions (frac-connections), piece u = stream u // m, fraction u % m."""
    return Kind("streams", seq, width=width, n=n, frac=frac if frac > 1 else None)


def patch_map() -> Kind:
    return Kind("patch_map", "byte")


def logits(vocab: int, seq: str = "token") -> Kind:
    return Kind("logits", seq, vocab=vocab)


LOSS = Kind("loss")


class KindError(ValueError):
    """An input of the wrong kind; `port` is the index of the offending input."""

    def __init__(self, message: str, port: int | None = None):
        super().__init__(message)
        self.port = port


def expect(ins, i: int, name: str, what: str = "") -> Kind:
    """Return input i, raising KindError unless it is of kind `name`."""
    if i >= len(ins):
        raise KindError(f"needs input {i + 1} ({name}{what}), got only {len(ins)}", i)
    if ins[i].name != name:
        raise KindError(f"input {i + 1} must be {name}{what}, got {ins[i]}", i)
    return ins[i]


def expect_count(ins, n: int | tuple[int, int]) -> None:
    lo, hi = (n, n) if isinstance(n, int) else n
    if not lo <= len(ins) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise KindError(f"takes {want} input{'s' if hi != 1 else ''}, got {len(ins)}")
