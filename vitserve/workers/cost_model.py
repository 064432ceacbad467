"""Measured cost of windows, built at capture from timings on this device.

A window's time is a part that grows with its tokens (GEMMs, norms, launch overhead), which
depends on how it runs (a padded shape's graph, or eager by token count), plus attention,
which grows with the sum of squared segment lengths: one 4096-token image costs far more
than sixteen 256-token ones. The runner uses the model to choose graph or eager per window;
the scheduler uses it to predict when a window will finish.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

TIMED_RUNS = 5
# On the CPU a forward takes the same time every run (no autotuning, no clocks ramping up, no
# launch jitter that a median must hide): one run, without a warm-up, measures it.
CPU_TIMED_RUNS = 1
Shape = tuple[int, int]  # (budget, segment slots)


@dataclass
class CostModel:
    attention_ms_per_token2: float = 0.0  # attention time per (segment length)², summed over segments
    padded_base_ms: dict[Shape, float] = field(default_factory=dict)  # padded window time without attention
    eager_base_points: list[tuple[int, float]] = field(default_factory=list)  # (tokens, ms without attention)

    @classmethod
    def from_lists(cls, attention_ms_per_token2: float, padded: list, eager: list) -> CostModel:
        """From plain lists as messages carry them: padded [(budget, slots, ms)], eager [(tokens, ms)]."""
        return cls(attention_ms_per_token2, {(b, s): ms for b, s, ms in padded}, [tuple(point) for point in eager])

    @classmethod
    def from_message(cls, cost) -> CostModel:
        """From a WorkerCost message (ipc/worker_messages.py), as workers report it and the cache keeps it."""
        return cls.from_lists(cost.attention_ms_per_token2, cost.padded_base_ms, cost.eager_base_points)

    def to_lists(self) -> tuple[float, list[tuple[int, int, float]], list[tuple[int, float]]]:
        return (self.attention_ms_per_token2, [(b, s, ms) for (b, s), ms in self.padded_base_ms.items()],
                list(self.eager_base_points))

    def padded_ms(self, shape: Shape, square_tokens: int) -> float:
        """Time of a padded window; `square_tokens` sums squared segment lengths, padding's included."""
        return self.padded_base_ms[shape] + self.attention_ms_per_token2 * square_tokens

    def eager_ms(self, tokens: int, square_tokens: int) -> float:
        """Time of an unpadded eager run; base piecewise-linear in tokens, extended linearly."""
        points = self.eager_base_points
        if not points:
            return float("nan")
        if len(points) == 1:
            base = points[0][1] * tokens / points[0][0]
        else:
            index = min(max(bisect.bisect_left([p[0] for p in points], tokens), 1), len(points) - 1)
            (x0, y0), (x1, y1) = points[index - 1], points[index]
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
            base = max(y0 + slope * (tokens - x0), 0.0)
        return base + self.attention_ms_per_token2 * square_tokens

    def prefer_padded(self, shape: Shape | None, tokens: int, square_tokens: int, padding: int) -> bool:
        """Run padded (graph) unless that is predicted slower than running the tokens eagerly."""
        if shape is None or shape not in self.padded_base_ms:
            return False
        eager = self.eager_ms(tokens, square_tokens)
        if math.isnan(eager):  # nothing measured eagerly: trust the graph
            return True
        return self.padded_ms(shape, square_tokens + padding**2) <= eager


def window_ms(cost: CostModel, capacities, tokens: int, sequences: int, square_tokens: int) -> float:
    """Predicted time of a window as the runner will run it: its padded graph, or eagerly when
    that is cheaper or no budget holds it. `capacities` is the runner's `Capacities`."""
    budget = capacities.fitting_budget(tokens)
    slots = capacities.fitting_slots(sequences)
    eager = cost.eager_ms(tokens, square_tokens)
    if budget is None or slots is None:
        return eager
    shape = (budget, slots)
    if shape not in cost.padded_base_ms:
        return eager
    padded = cost.padded_ms(shape, square_tokens + (budget - tokens) ** 2)
    return padded if math.isnan(eager) else min(padded, eager)


def time_ms(run: Callable[[], None], device: torch.device, runs: int | None = None) -> float:
    """Median wall time of `run`, synchronised on CUDA: after one warm-up over TIMED_RUNS runs on
    CUDA, CPU_TIMED_RUNS without a warm-up elsewhere (unless `runs` is given)."""
    if device.type == "cuda" or runs is not None:
        run()
    samples = []
    for _ in range(runs or (TIMED_RUNS if device.type == "cuda" else CPU_TIMED_RUNS)):
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
