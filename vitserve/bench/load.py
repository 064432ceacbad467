"""Load through the real engine: closed loop (a fixed number of requests outstanding) and open
loop (Poisson arrivals at a given rate), and the comparison of flush policies on the same
arrivals.

A request counts toward goodput when it returns a result within its deadline; a result
after the deadline and a `deadline_exceeded` error are both misses. Every request ends
exactly once, so completed + errors always equals sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


async def compare_policies(make_engine, requests: Sequence[Sequence[np.ndarray]], load: float, seconds: float,
                           deadline_ms: float, policies: Sequence[str], saturation_requests: int = 400,
                           seed: int = 0) -> dict:
    """Measure saturation once (closed loop), then run the same Poisson arrivals at `load` x saturation
    through an engine per policy. `make_engine(policy)` returns an Engine (not started)."""
    async with make_engine(policies[0]) as engine:
        await closed_loop(lambda items, d: engine.encode(items, d), requests, 64, 16)  # warm-up
        saturation = await closed_loop(lambda items, d: engine.encode(items, d), requests, saturation_requests, 64,
                                       label="saturation")
    rate = load * saturation.completed / saturation.seconds
    arrivals = poisson_arrivals(rate, seconds, seed)
    rows = []
    for policy in policies:
        async with make_engine(policy) as engine:
            await closed_loop(lambda items, d: engine.encode(items, d), requests, 32, 8)  # warm-up
            before = engine.stats()
            result = await open_loop(lambda items, d: engine.encode(items, d), requests, arrivals, deadline_ms,
                                     label=policy)
            after = engine.stats()
        windows = after["windows_sent"] - before["windows_sent"]
        rows.append(result.row() | {"windows": windows,
                                    "items_per_window": (after["items_sent"] - before["items_sent"]) / max(windows, 1),
                                    "scales": [s.scale for s in engine.scheduler.workers.values()]})
    return {"saturation_rps": saturation.completed / saturation.seconds, "rate_rps": rate, "load": load,
            "deadline_ms": deadline_ms, "arrivals": len(arrivals), "policies": rows}


def policy_table(report: dict) -> str:
    lines = [f"open loop at {report['load']:.0%} of saturation ({report['saturation_rps']:.1f} req/s): "
             f"{report['rate_rps']:.1f} req/s, {report['arrivals']} arrivals, deadline {report['deadline_ms']:.0f} ms",
             f"{'policy':<10} {'sent':>6} {'done':>6} {'miss %':>7} {'goodput/s':>10} {'img/s':>8} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'items/win':>9} {'scale':>6}  errors"]
    for row in report["policies"]:
        lines.append(f"{row['label']:<10} {row['sent']:>6} {row['completed']:>6} {row['miss_pct']:>7.2f} "
                     f"{row['goodput_rps']:>10.1f} {row['images_per_s']:>8.1f} {row['p50_ms']:>8.1f} "
                     f"{row['p99_ms']:>8.1f} {row['items_per_window']:>9.1f} "
                     f"{max(row['scales']):>6.2f}  {row['errors'] or ''}")
    return "\n".join(lines)


def with_policy(config, policy: str, max_delay_ms: float):
    """The engine config with the scheduler's policy replaced."""
    scheduler = dataclasses.replace(config.scheduler, policy=policy, max_delay_ms=max_delay_ms)
    return dataclasses.replace(config, scheduler=scheduler)
