"""Scheduler dispatch: the worker predicted to finish first, output rows in whole slots, cancel,
lost workers, and config validation."""

from __future__ import annotations

import math

import pytest
from scheduler_fakes import MAX_BUDGET, cost, ids, make, queued_ids, req, submit_ok

from vitserve.scheduler import POLICIES, Request, SchedulerConfig, WorkerState, deadline_at


# -- 7. worker choice -------------------------------------------------------------------------------


def test_window_goes_to_the_faster_worker():
    slow = WorkerState(0, lambda t, s, q: 10.0 + t / 100)
    fast = WorkerState(1, cost)
    scheduler = make(slow, fast)
    submit_ok(scheduler, req(1, (100, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    assert dispatch.worker == 1 and dispatch.predicted_ms == cost(100, 1, 100)
    assert fast.in_flight == {dispatch.window: dispatch.predicted_ms} and slow.in_flight == {}


def test_window_goes_to_the_idle_worker_when_the_other_is_busy():
    busy = WorkerState(0, cost, busy_until=1.0)
    idle = WorkerState(1, cost)
    scheduler = make(busy, idle)
    submit_ok(scheduler, req(1, (100, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    assert dispatch.worker == 1


def test_busy_fast_worker_still_wins_when_it_finishes_first():
    """Fast worker busy for 1 ms then 1.1 ms (finish 2.1 ms) beats a slow idle one (finish 50 ms); full window."""
    fast = WorkerState(0, cost, busy_until=0.001)
    slow = WorkerState(1, lambda t, s, q: 50.0)
    scheduler = make(slow, fast)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    assert dispatch.worker == 0
    assert fast.busy_until == 0.001 + cost(MAX_BUDGET, 1, 0) / 1e3


def test_busy_fast_worker_loses_when_its_queue_is_long():
    fast = WorkerState(0, cost, busy_until=1.0)
    slow = WorkerState(1, lambda t, s, q: 50.0)
    scheduler = make(fast, slow)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    assert dispatch.worker == 1


def test_windows_alternate_as_predicted_finish_times_grow():
    a, b = WorkerState(0, cost), WorkerState(1, cost)
    scheduler = make(a, b, in_flight_per_worker=2)
    for key in range(4):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [d.worker for d in dispatches] == [0, 1, 0, 1]


@pytest.mark.parametrize("unavailable", [
    dict(ready=False),
    dict(free_rows=0),
], ids=["not_ready", "no_free_rows"])
def test_unavailable_worker_gets_nothing_even_if_fastest(unavailable):
    fast = WorkerState(0, lambda t, s, q: 0.01, **unavailable)
    slow = WorkerState(1, lambda t, s, q: 100.0)
    scheduler = make(fast, slow, in_flight_per_worker=10)
    for key in range(3):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [d.worker for d in dispatches] == [1, 1, 1]
    assert fast.in_flight == {}


def test_nothing_is_dispatched_when_no_worker_is_available():
    scheduler = make(WorkerState(0, cost, ready=False), WorkerState(1, cost, free_rows=0))
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    assert scheduler.poll(0.0) == ([], [])
    assert queued_ids(scheduler) == [(1, 0)]


def test_worker_with_room_for_one_window_gets_at_most_one_window_per_poll():
    worker = WorkerState(0, cost, free_rows=MAX_BUDGET // 4)  # one full window's output rows
    scheduler = make(worker, in_flight_per_worker=2)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1), (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert len(dispatches) == 1


# -- 8. cancel and worker loss ----------------------------------------------------------------------


def test_cancel_removes_only_that_requests_queued_items():
    worker = WorkerState(0, cost, free_rows=0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (100, 1), (200, 1)))
    submit_ok(scheduler, req(2, (300, 1)))
    submit_ok(scheduler, req(3, (50, 1)))
    assert scheduler.cancel(1) is True
    assert queued_ids(scheduler) == [(2, 0), (3, 0)] and scheduler.queue.tokens == 350
    assert scheduler.cancel(1) is False  # nothing left of it
    assert scheduler.cancel(99) is False  # unknown
    worker.free_rows = 1 << 20
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(2, 0), (3, 0)]]


def test_cancel_leaves_in_flight_items_of_the_request_alone():
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (600, 1), (600, 1)))
    (dispatch,), _ = scheduler.poll(0.0)  # item 0 leaves (full), item 1 waits
    assert scheduler.cancel(1) is True
    assert len(scheduler.queue) == 0
    assert dispatch.window in worker.in_flight
    assert scheduler.window_done(dispatch.window, 10.01) is dispatch


def test_worker_lost_returns_its_in_flight_windows_and_gets_nothing_more():
    fast = WorkerState(0, lambda t, s, q: 0.5)
    slow = WorkerState(1, lambda t, s, q: 5.0)
    scheduler = make(fast, slow, in_flight_per_worker=2)
    for key in range(2):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [d.worker for d in dispatches] == [0, 0]
    lost = scheduler.worker_lost(0)
    assert sorted(d.window for d in lost) == sorted(d.window for d in dispatches)
    assert all(a is b for a, b in zip(sorted(lost, key=lambda d: d.window), dispatches))
    assert not fast.ready and fast.in_flight == {}
    for key in range(2, 5):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    later, _ = scheduler.poll(0.0)
    assert [d.worker for d in later] == [1, 1]
    scheduler.window_done(later[0].window, 0.005)
    last, _ = scheduler.poll(0.005)
    assert [d.worker for d in last] == [1]


def test_worker_lost_with_nothing_in_flight_returns_nothing():
    scheduler = make(WorkerState(0, cost), WorkerState(1, cost))
    assert scheduler.worker_lost(1) == []
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    assert [d.worker for d in scheduler.poll(0.0)[0]] == [0]


def test_items_of_a_lost_window_are_retried_ahead_of_later_arrivals_and_counted():
    worker = WorkerState(0, cost)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (100, 1), (200, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    submit_ok(scheduler, req(2, (300, 1)))
    (lost,) = scheduler.worker_lost(0)
    scheduler.retry(lost.items)
    assert queued_ids(scheduler) == [(1, 0), (1, 1), (2, 0)] and scheduler.queue.tokens == 600
    assert [item.lost for item in scheduler.queue] == [1, 1, 0]
    assert scheduler.poll(0.0)[0] == []  # no worker is ready
    scheduler.worker_back(0, lambda t, s, q: 2 * cost(t, s, q), free_rows=1 << 20, now=0.5)
    assert worker.ready and worker.busy_until == 0.5
    (again,), _ = scheduler.poll(0.5)
    assert ids(again) == [(1, 0), (1, 1), (2, 0)] and again.predicted_ms == 2 * cost(600, 3, 100**2 + 200**2 + 300**2)


# -- 9. config validation ---------------------------------------------------------------------------


def test_default_config_is_valid_and_zero_margins_are_allowed():
    config = SchedulerConfig()
    assert config.policy == "deadline" and config.policy in POLICIES
    SchedulerConfig(margin_ms=0, max_delay_ms=0.0, idle_lead_ms=0)


def test_unknown_policy_raises_naming_the_policy():
    with pytest.raises(ValueError, match=r"policy 'fifo' is unknown.*deadline.*immediate.*max_delay"):
        SchedulerConfig(policy="fifo")


@pytest.mark.parametrize(("field", "value"), [
    ("margin_ms", -1.0),
    ("margin_ms", math.nan),
    ("margin_ms", "2"),
    ("max_delay_ms", -0.5),
    ("max_delay_ms", None),
    ("idle_lead_ms", True),
    ("idle_lead_ms", -1),
    ("in_flight_per_worker", 0),
    ("in_flight_per_worker", 1.5),
    ("max_queued_items", -3),
    ("max_queued_items", True),
    ("max_queued_tokens", 0),
    ("max_queued_tokens", 1e6),
    ("lookahead", 0),
    ("lookahead", "64"),
])
def test_bad_numbers_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SchedulerConfig(**{field: value})


def test_deadline_at_converts_relative_ms_to_absolute_seconds():
    assert deadline_at(2.0, 500.0) == 2.5
    assert deadline_at(2.0, None) == math.inf


def test_a_window_needs_room_for_its_rows():
    """free_rows: a worker takes a window only when its output rows fit, and the count drops by them."""
    worker = WorkerState(0, cost, free_rows=100)
    scheduler = make(worker, in_flight_per_worker=10, policy="immediate")
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))  # 256 rows: does not fit
    submit_ok(scheduler, req(2, (400, 1)))  # 100 rows, but behind the big one in a window of its own
    assert scheduler.poll(0.0) == ([], [])
    worker.free_rows = 356
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)], [(2, 0)]] and worker.free_rows == 0


def test_stalled_on_memory_names_what_can_never_dispatch_until_released():
    worker = WorkerState(0, cost, free_rows=10)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (400, 1)))
    assert scheduler.poll(0.0) == ([], [])
    assert [r.key for r in scheduler.stalled_on_memory()] == [1]  # nothing in flight will free rows
    worker.in_flight[99] = 1.0
    assert scheduler.stalled_on_memory() == []  # a window in flight will give rows back


def test_rows_are_counted_in_whole_slots():
    """With row_granularity, a window needs its rows rounded up to whole slots: two windows of 257 rows need
    66 slots of 8 rows, so 520 free rows hold only one of them."""
    worker = WorkerState(0, cost, free_rows=520, row_granularity=8)
    scheduler = make(worker, in_flight_per_worker=10, policy="immediate")
    submit_ok(scheduler, req(1, (1028, 1)))
    submit_ok(scheduler, req(2, (1028, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]] and worker.free_rows == 520 - 264


def test_rows_are_the_items_own_when_the_request_gives_them():
    """A chunk of frames pooled into one frame's rows (Kimi K2.5) writes a quarter of tokens / merge:
    the window is placed by its items' rows, and the free count drops by exactly those."""
    worker = WorkerState(0, cost, free_rows=64)
    scheduler = make(worker, in_flight_per_worker=10, policy="immediate")
    # 4 frames of 16x16 patches: 1024 tokens, one segment, 64 rows (tokens / merge would say 256)
    submit_ok(scheduler, Request(key=1, priority=0, deadline=math.inf, arrival=0.0, shapes=[(1024, 1)], rows=[64]))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]] and worker.free_rows == 0


def test_suspect_workers_are_left_out_of_placement_and_the_memory_stall_alike():
    """A worker whose readiness is in doubt gets windows only while every worker up is suspect; its free
    rows do not count against a stall that a trusted worker's memory causes."""
    trusted, suspect = WorkerState(0, cost, free_rows=10), WorkerState(1, cost, suspect=True)
    scheduler = make(trusted, suspect, in_flight_per_worker=10, policy="immediate")
    submit_ok(scheduler, req(1, (400, 1)))
    assert scheduler.poll(0.0) == ([], [])  # only the suspect worker has room: it is not sent the window
    assert [r.key for r in scheduler.stalled_on_memory()] == [1]
    suspect.in_flight[99] = 1.0  # its window's end may prove it again: not a stall yet
    assert scheduler.stalled_on_memory() == []
    del suspect.in_flight[99]
    trusted.ready = False  # now every worker up is suspect: it takes windows again
    assert scheduler.stalled_on_memory() == []
    dispatches, _ = scheduler.poll(0.0)
    assert [(d.worker, ids(d)) for d in dispatches] == [(1, [(1, 0)])]
