"""Where a run's wall time goes: one clock split into named phases.

Phases are timed exclusively: one entered inside another pauses the outer one, and time in no
phase is `other`, so the phases always sum to the clock's wall time. A search trial's clock starts
with the trial (Optuna's part included); a `search.train` run's with `run_training`. Metric keys
are `time/<phase>_s`:

- setup: graph, model, data, loader, optimiser (and a trial's pre-flight checks);
- compile: the compile cache's load and writes and the first (compiling) step;
- train: training steps, the budget;
- sync: waiting at log points and before evaluations for the steps the GPU still has queued (a
  step returns once launched, so this is the device training: the budget, `train_s`, counts it
  with `train`, and so does a study's share of device time in training; 0 on the CPU);
- eval: evaluations; log: training metrics at log points (loss readback, jsonl, progress bar);
- checkpoint: checkpoint writes; track: MLflow (the run, its params, tags and artifacts, its end);
- study: Optuna (sampling, the storage, the pruner); teardown: freeing a trial's memory.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

PHASES = ("setup", "compile", "train", "sync", "eval", "log", "checkpoint", "track", "study",
          "teardown", "other")


@dataclass
class Span:
    """The exclusive seconds of one `with phases(name)` block, complete once the block ends."""
    name: str
    seconds: float = 0.0


class Phases:
    """A clock whose time is charged to the innermost open phase (`other` outside any)."""

    def __init__(self):
        self.start = self._since = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open = [Span("other")]

    def _charge(self) -> None:
        now = time.perf_counter()
        span = self._open[-1]
        span.seconds += now - self._since
        self.seconds[span.name] += now - self._since
        self._since = now

    @contextmanager
    def __call__(self, name: str) -> Iterator[Span]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        self._charge()
        span = Span(name)
        self._open.append(span)
        try:
            yield span
        finally:
            self._charge()
            self._open.pop()

    def split(self) -> dict[str, float]:
        """Seconds per phase so far; they sum to `wall()`."""
        self._charge()
        return dict(self.seconds)

    def wall(self) -> float:
        self._charge()
        return self._since - self.start

    def metrics(self) -> dict[str, float]:
        """`time/<phase>_s` for every phase, and `time/wall_s`."""
        split = self.split()
        return {**{f"time/{k}_s": v for k, v in split.items()}, "time/wall_s": sum(split.values())}
