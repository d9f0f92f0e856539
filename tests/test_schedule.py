"""Budgets parse as people write them; schedules warm up, anneal and end where the recipe says."""
from __future__ import annotations

import pytest

from graphs.recipe import Training
from search.budget import format_duration, parse_count, parse_duration
from search.schedule import lr_at


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2h", 7200),
                                           ("45", 45), ("0.5h", 1800), (30, 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "1h30", ""])
def test_bad_durations_say_how_to_write_them(text):
    with pytest.raises(ValueError, match="use e.g."):
        parse_duration(text)


def test_counts_and_formatting():
    assert parse_count("50M") == 50_000_000 and parse_count("2.5k") == 2500 and parse_count("1e6") == 10**6
    assert format_duration(3725) == "1h02m05s" and format_duration(59) == "59s"


def test_cosine_warms_up_then_anneals_to_the_floor():
    r = Training(lr=1.0, min_lr_ratio=0.1, warmup=0.1, schedule="cosine")
    assert lr_at(r, 0.0) == 0.0 and lr_at(r, 0.05) == pytest.approx(0.5)
    assert lr_at(r, 0.1) == pytest.approx(1.0)
    assert lr_at(r, 0.55) == pytest.approx(0.55)
    assert lr_at(r, 1.0) == pytest.approx(0.1) and lr_at(r, 2.0) == pytest.approx(0.1)
    xs = [lr_at(r, i / 100) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))


def test_wsd_is_stable_then_decays_linearly():
    r = Training(lr=2.0, min_lr_ratio=0.0, warmup=0.0, schedule="wsd", cooldown=0.2)
    assert lr_at(r, 0.0) == 2.0 and lr_at(r, 0.79) == 2.0
    assert lr_at(r, 0.9) == pytest.approx(1.0) and lr_at(r, 1.0) == pytest.approx(0.0)


def test_constant_and_no_warmup():
    r = Training(lr=0.3, warmup=0.0, schedule="constant")
    assert {lr_at(r, p) for p in (0.0, 0.5, 1.0)} == {0.3}
