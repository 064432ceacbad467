"""How the workers ran the windows, for /metrics: runs by budget and path (a graph replay, the graph's
buffers run eagerly, or an unpadded eager run and why), their patch tokens and their padding."""

from __future__ import annotations

import collections


class RunCounts:
    def __init__(self) -> None:
        self.runs: collections.Counter[tuple[int, str]] = collections.Counter()  # (budget, path) -> runs
        self.tokens = 0  # real patch tokens run
        self.padding = 0  # padding tokens run with them (graph windows fill their budget)

    def add(self, runs: list[tuple[int, str, int, int]]) -> None:
        for budget, path, tokens, padding in runs:
            self.runs[(budget, path)] += 1
            self.tokens += tokens
            self.padding += padding

    def snapshot(self) -> tuple[dict[tuple[int, str], int], int, int]:
        return dict(self.runs), self.tokens, self.padding
