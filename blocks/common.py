"""Small helpers shared by block families: initialisation and common kind rules."""
from __future__ import annotations

import torch

from blocks.kinds import Kind, KindError, expect_count


def normal_(t: torch.Tensor, std: float, gen) -> None:
    """In-place N(0, std) from generator `gen`; a no-op on the meta device."""
    if t.device.type != "meta":
        with torch.no_grad():
            t.normal_(0.0, std, generator=gen)


def fill_(t: torch.Tensor | None, value: float) -> None:
    if t is not None and t.device.type != "meta":
        with torch.no_grad():
            t.fill_(value)


def same_hidden(ins: list[Kind], allow_streams: bool = True) -> tuple[Kind]:
    """One input that is a residual stream (or n streams); the output has the same kind."""
    expect_count(ins, 1)
    ok = ("hidden", "streams") if allow_streams else ("hidden",)
    if ins[0].name not in ok:
        raise KindError(f"input must be {' or '.join(ok)}, got {ins[0]}", 0)
    return (ins[0],)
