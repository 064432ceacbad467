"""Counters of what the runner did: windows per budget, graph replays, eager runs by reason,
padding waste, and how full windows were."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .packing import Window


@dataclass
class RunnerStats:
    budget_windows: Counter = field(default_factory=Counter)  # budget -> padded windows run
    graph_replays: int = 0
    eager_runs: Counter = field(default_factory=Counter)  # reason -> unpadded eager windows
    windows: int = 0
    items: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    budget_tokens: int = 0  # sum of budgets over padded windows

    def record_padded(self, window: Window, sequences: int, replayed: bool) -> None:
        self._record(window, sequences)
        self.budget_windows[window.budget] += 1
        self.graph_replays += replayed
        self.padded_tokens += window.padding
        self.budget_tokens += window.budget

    def record_eager(self, window: Window, sequences: int, reason: str) -> None:
        self._record(window, sequences)
        self.eager_runs[reason] += 1

    def _record(self, window: Window, sequences: int) -> None:
        self.windows += 1
        self.items += len(window.items)
        self.sequences += sequences
        self.real_tokens += window.tokens

    def summary(self) -> dict:
        windows = max(self.windows, 1)
        return {
            "windows": self.windows,
            "windows_per_budget": dict(sorted(self.budget_windows.items())),
            "graph_replays": self.graph_replays,
            "eager_runs": dict(self.eager_runs),
            "padding_waste": self.padded_tokens / self.budget_tokens if self.budget_tokens else 0.0,
            "items_per_window": self.items / windows,
            "sequences_per_window": self.sequences / windows,
            "tokens_per_window": self.real_tokens / windows,
        }
