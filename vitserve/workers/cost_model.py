"""Measured cost of windows: each padded window shape's run (a graph replay on CUDA), and eager
runs by token count.

Built at capture from timings on this device; the runner uses it to choose graph or eager
for a window, and the scheduler to predict when a window will finish.
"""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

TIMED_RUNS = 5


@dataclass
class CostModel:
    padded_ms: dict[tuple[int, int], float] = field(default_factory=dict)  # (budget, slots) -> time
    eager_points: list[tuple[int, float]] = field(default_factory=list)  # (tokens, ms), sorted

    def eager_ms(self, tokens: int) -> float:
        """Piecewise-linear in tokens between measured sizes, extended linearly past them."""
        points = self.eager_points
        if not points:
            return float("nan")
        if len(points) == 1:
            return points[0][1] * tokens / points[0][0]
        index = min(max(bisect.bisect_left([p[0] for p in points], tokens), 1), len(points) - 1)
        (x0, y0), (x1, y1) = points[index - 1], points[index]
        return max(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0), 0.0)

    def window_ms(self, tokens: int, shape: tuple[int, int] | None) -> float:
        """Predicted time of a window: its padded shape's run, or eager when it has none."""
        if shape is not None and shape in self.padded_ms:
            return self.padded_ms[shape]
        return self.eager_ms(tokens)

    def prefer_padded(self, tokens: int, shape: tuple[int, int] | None) -> bool:
        """A padded window (graph) that is slower than running the tokens eagerly is not used."""
        if shape is None or shape not in self.padded_ms:
            return False
        eager = self.eager_ms(tokens)
        return eager != eager or self.padded_ms[shape] <= eager  # NaN: nothing measured, trust the graph


def time_ms(run: Callable[[], None], device: torch.device, runs: int = TIMED_RUNS) -> float:
    """Median wall time of `run` after one warm-up, synchronised on CUDA."""
    run()
    samples = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            run()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)
