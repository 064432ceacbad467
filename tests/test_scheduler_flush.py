"""Scheduler flushing on a fake clock and fake cost models: the deadline policy's rules (full,
deadline pressure, a worker about to run dry, in-flight limits) and the immediate and max_delay
policies it is compared with. Times are scheduler-clock seconds; predictions are ms."""

from __future__ import annotations

import pytest
from scheduler_fakes import MAX_BUDGET, cost, ids, make, queued_ids, req, submit_ok

from vitserve.scheduler import WorkerState


# -- 1. flush rule, deadline policy ----------------------------------------------------------------


def test_full_window_leaves_at_once_while_worker_is_busy():
    """Items that fill the largest budget exactly leave at once even though the worker is busy for 10 s."""
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, *[(256, 1)] * 4))  # 4 x 256 = 1024 = max budget
    dispatches, failures = scheduler.poll(0.0)
    assert failures == []
    assert [ids(d) for d in dispatches] == [[(1, 0), (1, 1), (1, 2), (1, 3)]]
    assert dispatches[0].tokens == MAX_BUDGET and dispatches[0].worker == 0
    assert len(scheduler.queue) == 0


def test_window_is_full_when_the_next_queued_item_does_not_fit_and_the_rest_waits():
    """600 + 600 > 1024: the first window is full (leaves at once, worker busy); the second is not and waits."""
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (600, 1), (600, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    assert queued_ids(scheduler) == [(1, 1)]
    # the worker is now busy until 10 s plus the first window's predicted time
    assert worker.busy_until == 10.0 + cost(600, 1, 0) / 1e3
    assert scheduler.wakeup == worker.busy_until - 1.0 / 1e3


def test_window_reaching_max_items_is_full_and_leaves_while_worker_is_busy():
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, *[(4, 1)] * 8))  # 8 items = max_items, only 32 tokens
    dispatches, _ = scheduler.poll(0.0)
    assert len(dispatches) == 1 and len(dispatches[0].items) == 8


def test_non_full_window_waits_while_worker_is_busy_and_leaves_idle_lead_before_it_runs_dry():
    """No deadline: poll returns nothing, wakeup = busy_until - idle_lead exactly; polling then dispatches."""
    worker = WorkerState(0, cost, busy_until=1.0)
    scheduler = make(worker, idle_lead_ms=1.0)
    submit_ok(scheduler, req(1, (100, 1)))
    assert scheduler.poll(0.0) == ([], [])
    assert scheduler.wakeup == 1.0 - 1.0 / 1e3
    # still too early just before the wakeup
    assert scheduler.poll(scheduler.wakeup - 1e-6) == ([], [])
    wakeup = scheduler.wakeup
    assert wakeup == 1.0 - 1.0 / 1e3
    dispatches, failures = scheduler.poll(wakeup)
    assert failures == []
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    assert scheduler.wakeup is None  # nothing left to wait for


def test_non_full_window_with_a_far_deadline_still_waits_for_the_idle_bound():
    """A deadline far beyond busy_until + predicted + margin does not make the window leave:
    wakeup is the idle bound."""
    worker = WorkerState(0, cost, busy_until=1.0)
    scheduler = make(worker, idle_lead_ms=1.0, margin_ms=2.0)
    submit_ok(scheduler, req(1, (100, 1), deadline=5.0))
    assert scheduler.poll(0.0) == ([], [])
    # the deadline bound (5.0 - (1.1 + 2) ms) is later than the idle bound, so the idle bound wins
    assert scheduler.wakeup == 1.0 - 1.0 / 1e3
    dispatches, _ = scheduler.poll(scheduler.wakeup)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]


def test_deadline_pressure_makes_a_non_full_window_leave_at_once():
    """Waiting for the busy worker would miss the deadline (start + predicted + margin > deadline): leave now.

    Whole ms: the worker is busy until 1.0 s, the window takes 1.1 ms, margin 2 ms; a deadline of
    1.0 s + 3 ms is 0.1 ms short of what waiting needs, so the window is sent at once rather than at
    the idle bound (1.0 s - 1 ms).
    """
    worker = WorkerState(0, cost, busy_until=1.0)
    scheduler = make(worker, idle_lead_ms=1.0, margin_ms=2.0)
    submit_ok(scheduler, req(1, (100, 1), deadline=1.003))
    dispatches, failures = scheduler.poll(0.0)
    assert failures == []
    assert [ids(d) for d in dispatches] == [[(1, 0)]]


def test_deadline_with_just_enough_slack_waits_until_the_idle_bound():
    """start + predicted + margin <= deadline: waiting is still safe, the window waits (idle bound first)."""
    worker = WorkerState(0, cost, busy_until=1.0)
    scheduler = make(worker, idle_lead_ms=1.0, margin_ms=2.0)
    submit_ok(scheduler, req(1, (100, 1), deadline=1.0 + 3.2 / 1e3))  # 1.1 ms + 2 ms fits in 3.2 ms
    assert scheduler.poll(0.0) == ([], [])
    wakeup = scheduler.wakeup
    assert wakeup == 1.0 - 1.0 / 1e3
    assert [ids(d) for d in scheduler.poll(wakeup)[0]] == [[(1, 0)]]


def test_idle_worker_gets_a_tiny_window_at_once():
    scheduler = make(WorkerState(0, cost, busy_until=0.0))
    submit_ok(scheduler, req(1, (4, 1)), now=5.0)
    dispatches, _ = scheduler.poll(5.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    assert dispatches[0].predicted_ms == cost(4, 1, 16)


def test_worker_about_to_run_dry_within_idle_lead_gets_the_window_at_once():
    """busy_until is 0.5 ms away with idle_lead 1 ms: dispatch now; 1.5 ms away: wait."""
    soon = WorkerState(0, cost, busy_until=0.0005)
    scheduler = make(soon, idle_lead_ms=1.0)
    submit_ok(scheduler, req(1, (100, 1)))
    assert [ids(d) for d in scheduler.poll(0.0)[0]] == [[(1, 0)]]

    later = WorkerState(0, cost, busy_until=0.0015)
    scheduler = make(later, idle_lead_ms=1.0)
    submit_ok(scheduler, req(1, (100, 1)))
    assert scheduler.poll(0.0) == ([], [])
    assert scheduler.wakeup == 0.0015 - 1.0 / 1e3


def test_in_flight_limit_holds_a_third_window_until_window_done():
    """in_flight_per_worker=2: two full windows leave, the third waits (no wakeup) until a window completes."""
    worker = WorkerState(0, cost)
    scheduler = make(worker, in_flight_per_worker=2)
    for key in (1, 2, 3):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)], [(2, 0)]]
    assert len(worker.in_flight) == 2
    assert scheduler.wakeup is None  # a completion, not a timer, frees the worker
    assert scheduler.poll(0.5) == ([], [])  # time alone does not help
    done = scheduler.window_done(dispatches[0].window, 0.001)
    assert done is dispatches[0]
    assert worker.busy_until == 0.001 + dispatches[1].predicted_ms / 1e3  # what is left in flight
    third, _ = scheduler.poll(0.001)
    assert [ids(d) for d in third] == [[(3, 0)]]
    assert set(worker.in_flight) == {dispatches[1].window, third[0].window}


def test_window_done_of_the_last_window_leaves_the_worker_idle():
    worker = WorkerState(0, cost)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))
    (dispatch,), _ = scheduler.poll(0.0)
    assert worker.busy_until == pytest.approx(cost(MAX_BUDGET, 1, 0) / 1e3)
    scheduler.window_done(dispatch.window, 0.5)
    assert worker.in_flight == {} and worker.busy_until == 0.5


# -- 2. policies immediate and max_delay ------------------------------------------------------------


def test_immediate_policy_sends_a_tiny_window_while_the_worker_is_busy():
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker, policy="immediate", in_flight_per_worker=2)
    submit_ok(scheduler, req(1, (4, 1)))
    assert [ids(d) for d in scheduler.poll(0.0)[0]] == [[(1, 0)]]
    submit_ok(scheduler, req(2, (4, 1)))
    assert [ids(d) for d in scheduler.poll(0.0)[0]] == [[(2, 0)]]
    submit_ok(scheduler, req(3, (4, 1)))
    assert scheduler.poll(0.0) == ([], [])  # in-flight limit still applies
    assert queued_ids(scheduler) == [(3, 0)]


def test_max_delay_policy_waits_for_the_oldest_item_even_with_an_idle_worker():
    """Idle worker, non-full window: waits until the oldest item's arrival + max_delay_ms, then leaves."""
    scheduler = make(policy="max_delay", max_delay_ms=5.0)
    submit_ok(scheduler, req(1, (100, 1), arrival=1.0), now=1.0)
    assert scheduler.poll(1.0) == ([], [])
    assert scheduler.wakeup == 1.0 + 5.0 / 1e3
    submit_ok(scheduler, req(2, (100, 1), arrival=1.003), now=1.003)
    assert scheduler.poll(1.003) == ([], [])
    assert scheduler.wakeup == 1.0 + 5.0 / 1e3  # measured from the oldest item, not the newest
    dispatches, _ = scheduler.poll(1.0 + 5.0 / 1e3)
    assert [ids(d) for d in dispatches] == [[(1, 0), (2, 0)]]


def test_max_delay_policy_sends_a_full_window_at_once():
    scheduler = make(policy="max_delay", max_delay_ms=5.0)
    submit_ok(scheduler, req(1, *[(512, 1)] * 2))
    assert [ids(d) for d in scheduler.poll(0.0)[0]] == [[(1, 0), (1, 1)]]


def test_max_delay_policy_ignores_deadline_pressure():
    """max_delay waits its delay even when the item's deadline will then be missed (it is a baseline)."""
    scheduler = make(policy="max_delay", max_delay_ms=5.0, fail_early=False)
    submit_ok(scheduler, req(1, (100, 1), deadline=0.002))
    assert scheduler.poll(0.0) == ([], [])
    assert scheduler.wakeup == 0.005


def test_switching_a_live_scheduler_to_immediate_sends_what_the_deadline_policy_held():
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker, in_flight_per_worker=2)
    submit_ok(scheduler, req(1, (4, 1), deadline=100.0))
    assert scheduler.poll(0.0) == ([], [])  # deadline policy: the busy worker lets the window grow
    scheduler.use_policy("immediate")
    assert [ids(d) for d in scheduler.poll(0.0)[0]] == [[(1, 0)]]
    scheduler.use_policy("max_delay", max_delay_ms=7.0)
    assert (scheduler.config.policy, scheduler.config.max_delay_ms) == ("max_delay", 7.0)
    with pytest.raises(ValueError, match="unknown"):
        scheduler.use_policy("fastest")
