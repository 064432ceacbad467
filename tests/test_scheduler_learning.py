"""The scheduler learns each worker's processing time against its cost model (its scale) and the
latency of a window sent to an idle worker beyond that (its overhead), and keeps a margin that
grows with the prediction. Fake clock; times are scheduler-clock seconds, predictions ms."""

from __future__ import annotations

import pytest
from scheduler_fakes import MAX_BUDGET, cost, ids, make, req, submit_ok

from vitserve.scheduler import WorkerState
from vitserve.scheduler.learning import LEARNING_RATE as SCALE_LEARNING_RATE
from vitserve.scheduler.learning import SCALE_BOUNDS

FULL_MS = cost(MAX_BUDGET, 1, 0)  # the fake model's time for a full window


def run_back_to_back(scheduler, key: int, sent: float, processing_ms: float) -> float:
    """Two full windows leave together at `sent`; each takes `processing_ms` on the worker, the
    second after the first. Returns the second's completion time."""
    submit_ok(scheduler, req(key, (MAX_BUDGET, 1)), now=sent)
    submit_ok(scheduler, req(key + 1, (MAX_BUDGET, 1)), now=sent)
    first, second = scheduler.poll(sent)[0]
    scheduler.window_done(first.window, sent + processing_ms / 1e3)
    done = sent + 2 * processing_ms / 1e3
    scheduler.window_done(second.window, done)
    return done


def run_alone(scheduler, key: int, sent: float, latency_ms: float) -> float:
    """One full window sent to an idle worker, completing `latency_ms` later."""
    submit_ok(scheduler, req(key, (MAX_BUDGET, 1)), now=sent)
    (dispatch,), _ = scheduler.poll(sent)
    scheduler.window_done(dispatch.window, sent + latency_ms / 1e3)
    return sent + latency_ms / 1e3


def test_windows_queued_behind_another_teach_the_processing_scale():
    """The second window of each pair is timed from the first's completion: twice the model."""
    worker = WorkerState(0, cost)
    scheduler = make(worker, learn_costs=True)
    now = run_back_to_back(scheduler, 1, 0.0, 2 * FULL_MS)
    assert worker.scale == pytest.approx(1 + SCALE_LEARNING_RATE * (2 - 1))
    for key in range(3, 160, 2):
        now = run_back_to_back(scheduler, key, now + 0.01, 2 * FULL_MS)
    assert worker.scale == pytest.approx(2.0, rel=1e-3)
    submit_ok(scheduler, req(999, (MAX_BUDGET, 1)), now=now)
    (dispatch,), _ = scheduler.poll(now)
    assert dispatch.predicted_ms == pytest.approx(2 * FULL_MS, rel=1e-3)
    assert dispatch.modelled_ms == FULL_MS


def test_windows_sent_to_an_idle_worker_teach_the_overhead_not_the_scale():
    """Each window takes the model's time plus 5 ms of messages and uploads: the scale stays 1 and
    the overhead converges to 5 ms; a busy worker then gets its next window that much earlier."""
    worker = WorkerState(0, cost)
    scheduler = make(worker, learn_costs=True, idle_lead_ms=1.0)
    now = 0.0
    for key in range(1, 80):
        now = run_alone(scheduler, key, now + 0.01, FULL_MS + 5.0)
    assert worker.scale == 1.0
    assert worker.overhead_ms == pytest.approx(5.0, rel=1e-3)
    worker.busy_until = now + 1.0
    submit_ok(scheduler, req(500, (100, 1)), now=now)
    assert scheduler.poll(now) == ([], [])
    assert scheduler.wakeup == pytest.approx(now + 1.0 - (1.0 + worker.overhead_ms) / 1e3)


def test_an_idle_worker_finishes_a_window_after_its_overhead_and_processing():
    worker = WorkerState(0, cost, overhead_ms=4.0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)), now=2.0)
    scheduler.poll(2.0)
    assert worker.busy_until == pytest.approx(2.0 + (4.0 + FULL_MS) / 1e3)


def test_one_wild_observation_moves_the_scale_only_to_its_bound():
    worker = WorkerState(0, cost)
    scheduler = make(worker, learn_costs=True)
    run_back_to_back(scheduler, 1, 0.0, 1000 * FULL_MS)
    # the first window went to an idle worker (overhead); the second, queued, teaches the scale
    assert worker.scale == pytest.approx(1 + SCALE_LEARNING_RATE * (SCALE_BOUNDS[1] - 1))


def test_without_learning_the_model_is_used_as_measured():
    worker = WorkerState(0, cost)
    scheduler = make(worker, learn_costs=False)
    run_back_to_back(scheduler, 1, 0.0, 3 * FULL_MS)
    run_alone(scheduler, 3, 1.0, FULL_MS + 50.0)
    assert worker.scale == 1.0 and worker.overhead_ms == 0.0


def test_the_relative_margin_makes_a_window_leave_when_the_fixed_margin_alone_would_wait():
    """Busy until 1.0 s; the window takes 1.1 ms; deadline 3.2 ms after 1.0 s. With a 2 ms margin alone
    waiting fits (1.1 + 2 <= 3.2); with half the prediction added (1.1 * 1.5 + 2 = 3.65) it does not."""
    fixed = make(WorkerState(0, cost, busy_until=1.0), idle_lead_ms=1.0, margin_ms=2.0)
    submit_ok(fixed, req(1, (100, 1), deadline=1.0032))
    assert fixed.poll(0.0) == ([], [])

    relative = make(WorkerState(0, cost, busy_until=1.0), idle_lead_ms=1.0, margin_ms=2.0, margin_fraction=0.5)
    submit_ok(relative, req(1, (100, 1), deadline=1.0032))
    dispatches, _ = relative.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]


def test_the_deadline_bound_leaves_the_overhead_before_the_latest_start():
    """Far from busy (busy until 1.0 s, deadline 1.5 s): the window may wait, and with a 10 ms overhead
    it must leave 10 ms before the latest start that keeps the margin (idle bound is later here)."""
    worker = WorkerState(0, cost, busy_until=1.0, overhead_ms=10.0)
    scheduler = make(worker, idle_lead_ms=1.0, margin_ms=2.0)
    submit_ok(scheduler, req(1, (100, 1), deadline=1.015))
    assert scheduler.poll(0.0) == ([], [])
    latest_start = 1.015 - (cost(100, 1, 0) + 2.0) / 1e3
    assert scheduler.wakeup == pytest.approx(min(latest_start - 0.010, 1.0 - 0.011))


def test_early_failure_counts_the_learned_scale_and_overhead():
    """A deadline the model's time would meet fails at once when the learned time cannot."""
    worker = WorkerState(0, cost, scale=2.0, overhead_ms=3.0)
    scheduler = make(worker)
    deadline_ms = 1.5 * FULL_MS
    failure = scheduler.submit(req(1, (MAX_BUDGET, 1), deadline=deadline_ms / 1e3), 0.0)
    assert failure is not None and failure.code == "deadline_exceeded"
    ok = scheduler.submit(req(2, (MAX_BUDGET, 1), deadline=(2 * FULL_MS + 3.5) / 1e3), 0.0)
    assert ok is None


def test_failed_or_unsent_windows_teach_nothing():
    """A window that failed (or never left) ends at once: timing it would drag the overhead to zero."""
    worker = WorkerState(0, cost, scale=1.5, overhead_ms=4.0)
    scheduler = make(worker, learn_costs=True)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    scheduler.window_done(dispatch.window, 0.0001, learn=False)
    assert (worker.scale, worker.overhead_ms, worker.last_done) == (1.5, 4.0, float("-inf"))
    assert worker.in_flight == {}
