"""Latency histograms the engine keeps for /metrics: plain counters on the engine's loop, no locks and
no allocation per observation; a scrape copies them in one loop turn (engine/http_endpoint.py)."""

from __future__ import annotations

import bisect

# upper bounds in seconds (Prometheus' `le`), then +Inf
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = {
    "queue_wait": "From a request's admission to the dispatch of each of its items' window",
    "window_run": "From a window's dispatch to its worker's reply (preprocessing, encoding and the output copy)",
    "end_to_end": "From a request's admission to its result",
}


class Histograms:
    def __init__(self) -> None:
        self._counts = {stage: [0] * (len(BUCKETS_S) + 1) for stage in STAGES}  # per bucket, not cumulative
        self._sums = dict.fromkeys(STAGES, 0.0)

    def observe(self, stage: str, seconds: float) -> None:
        self._counts[stage][bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self._sums[stage] += seconds

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """Per stage: cumulative counts per bucket (the last one: all), and the sum of seconds."""
        out = {}
        for stage, counts in self._counts.items():
            cumulative, total = [], 0
            for count in counts:
                total += count
                cumulative.append(total)
            out[stage] = (cumulative, self._sums[stage])
        return out
