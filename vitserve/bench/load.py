"""Load through the real engine: closed loop (a fixed number of requests outstanding) and open
loop (Poisson arrivals at a given rate).

A request counts toward goodput when it returns a result within its deadline; a result
after the deadline and a `deadline_exceeded` error are both misses. Every request ends
exactly once, so completed + errors always equals sent.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from vitserve.engine import EngineError

Encode = Callable[[Sequence[np.ndarray], float | None, int], Awaitable]  # (items, deadline_ms, priority) -> result


@dataclass(frozen=True)
class Job:
    """One request of a load: its items, deadline and priority, and the class it is counted in."""

    items: Sequence[np.ndarray]
    deadline_ms: float | None = None
    priority: int = 0
    kind: str = ""  # empty: counted only in the total


async def until_settled(stats: Callable[[], Any], timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
    """Until the engine runs at full speed: every worker's graphs captured, every standby process
    loaded (`stats`: a client's stats, or an embedded engine's). TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            counts = stats()
            counts = await counts if inspect.isawaitable(counts) else counts
            if not counts.get("workers_warming") and not counts.get("standby_loading"):
                return
            await asyncio.sleep(poll_s)


def jobs_of(requests: Sequence[Sequence[np.ndarray]], deadline_ms: float | None) -> list[Job]:
    return [Job(items, deadline_ms) for items in requests]


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
    classes: dict[str, LoadResult] = field(default_factory=dict)  # the same, per class of job

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
        } | ({"classes": {kind: part.row() for kind, part in sorted(self.classes.items())}} if self.classes else {})

    def ended(self, seconds: float) -> LoadResult:
        for part in (self, *self.classes.values()):
            part.seconds = seconds
        return self

    def merge(self, other: LoadResult) -> None:
        """Add `other`'s requests (not its seconds) to this one's, class by class."""
        self.sent += other.sent
        self.completed += other.completed
        self.late += other.late
        self.errors.update(other.errors)
        self.latencies_ms.extend(other.latencies_ms)
        self.images += other.images
        for kind, part in other.classes.items():
            self.classes.setdefault(kind, LoadResult(kind)).merge(part)


async def _one(encode: Encode, job: Job, result: LoadResult) -> None:
    counted = [result] + ([result.classes.setdefault(job.kind, LoadResult(job.kind))] if job.kind else [])
    began = time.perf_counter()
    for part in counted:
        part.sent += 1
    try:
        encoded = await encode(job.items, job.deadline_ms, job.priority)
    except EngineError as err:
        for part in counted:
            part.errors[err.code] += 1
        return
    latency = (time.perf_counter() - began) * 1e3
    encoded.release()
    for part in counted:
        part.completed += 1
        part.images += len(job.items)
        part.latencies_ms.append(latency)
        if job.deadline_ms is not None and latency > job.deadline_ms:
            part.late += 1


async def closed_loop(encode: Encode, jobs: Sequence[Job], total: int, concurrency: int,
                      label: str = "closed") -> LoadResult:
    """`total` jobs, `concurrency` outstanding at any time."""
    result = LoadResult(label)
    sent = iter(range(total))

    async def lane() -> None:
        for index in sent:
            await _one(encode, jobs[index % len(jobs)], result)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return result.ended(time.perf_counter() - began)


def poisson_arrivals(rate_per_s: float, seconds: float, seed: int = 0) -> list[float]:
    rng, now, arrivals = random.Random(seed), 0.0, []
    while True:
        now += rng.expovariate(rate_per_s)
        if now >= seconds:
            return arrivals
        arrivals.append(now)


async def open_loop(encode: Encode, jobs: Sequence[Job], arrivals: Sequence[float], label: str = "open") -> LoadResult:
    """One job at each arrival time (seconds from the start), whatever the engine's pace."""
    result = LoadResult(label)
    tasks = []
    began = time.perf_counter()
    for index, at in enumerate(arrivals):
        delay = began + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(encode, jobs[index % len(jobs)], result)))
    await asyncio.gather(*tasks)
    return result.ended(time.perf_counter() - began)
