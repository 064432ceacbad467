"""Fakes shared by the scheduler tests: capacities, a cost model, requests, and readers of dispatches."""

from __future__ import annotations

import math

from vitserve.scheduler import Dispatch, Request, Scheduler, SchedulerConfig, WorkerState
from vitserve.workers import Capacities

CAPS = Capacities(budgets=(256, 512, 1024), max_items=8, max_sequences=16, merge_factor=4)
MAX_BUDGET = CAPS.max_budget


def cost(tokens: int, sequences: int, square_tokens: int) -> float:
    """The default fake cost model: 1 ms launch plus 1 ms per 1000 tokens."""
    return 1.0 + tokens / 1000


def make(*workers: WorkerState, caps: Capacities = CAPS, **config) -> Scheduler:
    """A scheduler whose predictions are the fake cost model's exactly (no learned scale, no relative
    margin) unless the test turns those on."""
    if not workers:
        workers = (WorkerState(0, cost),)
    config = {"margin_fraction": 0.0, "learn_costs": False} | config
    return Scheduler(SchedulerConfig(**config), caps, list(workers))


def req(key: int, *shapes: tuple[int, int], priority: int = 0, deadline: float = math.inf,
        arrival: float = 0.0) -> Request:
    return Request(key=key, priority=priority, deadline=deadline, arrival=arrival, shapes=list(shapes))


def ids(dispatch: Dispatch) -> list[tuple[int, int]]:
    """(request key, item index) of a window's items, in window order."""
    return [(item.request.key, item.index) for item in dispatch.items]


def submit_ok(scheduler: Scheduler, request: Request, now: float = 0.0) -> None:
    assert scheduler.submit(request, now) is None


def queued_ids(scheduler: Scheduler) -> list[tuple[int, int]]:
    return [(item.request.key, item.index) for item in scheduler.queue]

def poll_until_empty(scheduler: Scheduler, now: float = 0.0) -> list[Dispatch]:
    """Poll now, then at each wakeup, until the queue is empty; all windows in dispatch order."""
    dispatches: list[Dispatch] = []
    for _ in range(100):
        dispatches += scheduler.poll(now)[0]
        if not len(scheduler.queue):
            return dispatches
        assert scheduler.wakeup is not None and scheduler.wakeup > now
        now = scheduler.wakeup
    raise AssertionError("the queue did not drain")


def one_per_window(scheduler: Scheduler, now: float = 0.0) -> list[int]:
    """Request keys in dispatch order, when every item fills a window of its own."""
    dispatches, _ = scheduler.poll(now)
    assert all(len(d.items) == 1 for d in dispatches)
    return [d.items[0].request.key for d in dispatches]
