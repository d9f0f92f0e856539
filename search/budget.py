"""Parsing of budgets: durations ('90s', '10m', '1h30m', '2h') and token counts ('50M')."""
from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_COUNT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_duration(text: str | float | int) -> float:
    """Seconds in '90s', '10m', '1h30m', '2h', or a bare number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r}: use e.g. 90s, 10m, 1h30m, 2h")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_count(text: str | int) -> int:
    """An integer count such as '50M', '2.5k', '1e6' or 1000000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgbt]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read count {text!r}: use e.g. 50M, 2.5k, 1000000")
    return int(float(m.group(1)) * _COUNT[m.group(2)])


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
