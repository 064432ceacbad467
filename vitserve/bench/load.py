"""Load through the real engine: closed loop (a fixed number of requests outstanding) and open
loop (Poisson arrivals at a given rate).

A request counts toward goodput when it returns a result within its deadline; a result
after the deadline and a `deadline_exceeded` error are both misses. Every request ends
exactly once, so completed + errors always equals sent.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np

from vitserve.engine import EngineError

Encode = Callable[[Sequence[np.ndarray], float | None], Awaitable]  # (items, deadline_ms) -> result with release()


@dataclass
class LoadResult:
    label: str
    sent: int = 0
    completed: int = 0  # results, in time or late
    late: int = 0  # results after their deadline
    errors: Counter = field(default_factory=Counter)  # code -> count
    latencies_ms: list[float] = field(default_factory=list)  # of results
    images: int = 0
    seconds: float = 0.0

    @property
    def misses(self) -> int:
        return self.late + self.errors["deadline_exceeded"]

    @property
    def goodput(self) -> float:
        """Requests answered within their deadline, per second."""
        return (self.completed - self.late) / self.seconds if self.seconds else 0.0

    def row(self) -> dict:
        quantiles = statistics.quantiles(self.latencies_ms, n=100) if len(self.latencies_ms) > 1 else [float("nan")] * 99
        return {
            "label": self.label, "sent": self.sent, "completed": self.completed, "errors": dict(self.errors),
            "miss_pct": 100.0 * self.misses / max(self.sent, 1), "goodput_rps": self.goodput,
            "images_per_s": self.images / self.seconds if self.seconds else 0.0,
            "p50_ms": quantiles[49], "p99_ms": quantiles[98],
        }


async def _one(encode: Encode, items: Sequence[np.ndarray], deadline_ms: float | None, result: LoadResult) -> None:
    began = time.perf_counter()
    result.sent += 1
    try:
        encoded = await encode(items, deadline_ms)
    except EngineError as err:
        result.errors[err.code] += 1
        return
    latency = (time.perf_counter() - began) * 1e3
    encoded.release()
    result.completed += 1
    result.images += len(items)
    result.latencies_ms.append(latency)
    if deadline_ms is not None and latency > deadline_ms:
        result.late += 1


async def closed_loop(encode: Encode, requests: Sequence[Sequence[np.ndarray]], total: int, concurrency: int,
                      deadline_ms: float | None = None, label: str = "closed") -> LoadResult:
    """`total` requests, `concurrency` outstanding at any time."""
    result = LoadResult(label)
    sent = iter(range(total))

    async def lane() -> None:
        for index in sent:
            await _one(encode, requests[index % len(requests)], deadline_ms, result)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - began
    return result


def poisson_arrivals(rate_per_s: float, seconds: float, seed: int = 0) -> list[float]:
    rng, now, arrivals = random.Random(seed), 0.0, []
    while True:
        now += rng.expovariate(rate_per_s)
        if now >= seconds:
            return arrivals
        arrivals.append(now)


async def open_loop(encode: Encode, requests: Sequence[Sequence[np.ndarray]], arrivals: Sequence[float],
                    deadline_ms: float | None, label: str = "open") -> LoadResult:
    """One request at each arrival time (seconds from the start), whatever the engine's pace."""
    result = LoadResult(label)
    tasks = []
    began = time.perf_counter()
    for index, at in enumerate(arrivals):
        delay = began + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(encode, requests[index % len(requests)], deadline_ms, result)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - began
    return result
