"""Histograms the engine keeps for /metrics (stage latencies, and what windows held): plain counters
on the engine's loop, no locks and no allocation per observation; a scrape copies them in one loop
turn (engine/http_endpoint.py)."""

from __future__ import annotations

import bisect

# upper bounds (Prometheus' `le`), then +Inf
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = {  # seconds: exported as vitserve_<stage>_seconds
    "queue_wait": "From a request's admission to the dispatch of each of its items' window",
    "preprocess": "Per window, in its worker: uploading its inputs and preprocessing them (device time on GPUs)",
    "window_run": "From a window's dispatch to its worker's reply (preprocessing, encoding and the output copy)",
    "output_transfer": "Per window, in its worker: the copy of its rows to shared memory after its last forward "
                       "(device time on GPUs)",
    "end_to_end": "From a request's admission to its result",
}
COUNTS = {  # exported as vitserve_<name>
    "items_per_window": "Items in each window sent to a worker",
    "sequences_per_window": "Attention sequences (images, video chunks) in each window sent to a worker",
}


class Histograms:
    def __init__(self) -> None:
        self._bounds = dict.fromkeys(STAGES, BUCKETS_S) | dict.fromkeys(COUNTS, COUNT_BUCKETS)
        self._counts = {name: [0] * (len(bounds) + 1) for name, bounds in self._bounds.items()}  # per bucket
        self._sums = dict.fromkeys(self._bounds, 0.0)

    def observe(self, stage: str, seconds: float) -> None:
        self._counts[stage][bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self._sums[stage] += seconds

    def count(self, name: str, value: int) -> None:
        self._counts[name][bisect.bisect_left(COUNT_BUCKETS, value)] += 1
        self._sums[name] += value

    def snapshot(self) -> dict[str, tuple[tuple[float, ...], list[int], float]]:
        """Per histogram: its bucket bounds, cumulative counts per bucket (the last one: all), and the sum."""
        out = {}
        for name, counts in self._counts.items():
            cumulative, total = [], 0
            for count in counts:
                total += count
                cumulative.append(total)
            out[name] = (self._bounds[name], cumulative, self._sums[name])
        return out
