"""How the workers ran the windows, for /metrics: runs by budget and path (a graph replay, the graph's
buffers run eagerly, or an unpadded eager run and why), their patch tokens and their padding, and
each worker's windows and device time (how evenly the windows spread over several devices)."""

from __future__ import annotations

import collections
from typing import NamedTuple


class RunTotals(NamedTuple):
    runs: dict[tuple[int, str], int]  # (budget, path) -> runs
    tokens: int
    padding: int
    worker_windows: dict[int, int]  # worker -> windows it answered
    worker_busy_ms: dict[int, float]  # worker -> device time its windows kept busy


class RunCounts:
    def __init__(self) -> None:
        self.runs: collections.Counter[tuple[int, str]] = collections.Counter()  # (budget, path) -> runs
        self.tokens = 0  # real patch tokens run
        self.padding = 0  # padding tokens run with them (graph windows fill their budget)
        self.worker_windows: collections.Counter[int] = collections.Counter()
        self.worker_busy_ms: collections.defaultdict[int, float] = collections.defaultdict(float)

    def add(self, worker: int, runs: list[tuple[int, str, int, int]], busy_ms: float) -> None:
        """A window `worker` answered: its forward runs, and the device time it kept busy."""
        self.worker_windows[worker] += 1
        self.worker_busy_ms[worker] += busy_ms
        for budget, path, tokens, padding in runs:
            self.runs[(budget, path)] += 1
            self.tokens += tokens
            self.padding += padding

    def snapshot(self) -> RunTotals:
        return RunTotals(dict(self.runs), self.tokens, self.padding, dict(self.worker_windows),
                         dict(self.worker_busy_ms))
