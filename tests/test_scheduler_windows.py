"""Window formation: priority, deadline and arrival order, splitting requests, and the token, item
and sequence capacities with lookahead."""

from __future__ import annotations

from scheduler_fakes import MAX_BUDGET, cost, ids, make, one_per_window, poll_until_empty, queued_ids, req, submit_ok

from vitserve.scheduler import WorkerState


# -- 3. ordering ----------------------------------------------------------------------------------


def test_lower_priority_value_is_dispatched_first():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1), priority=2))
    submit_ok(scheduler, req(2, (MAX_BUDGET, 1), priority=0))
    submit_ok(scheduler, req(3, (MAX_BUDGET, 1), priority=1, deadline=0.5))
    assert one_per_window(scheduler) == [2, 3, 1]


def test_earliest_deadline_first_within_a_priority_and_no_deadline_last():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1)))  # no deadline
    submit_ok(scheduler, req(2, (MAX_BUDGET, 1), deadline=2.0))
    submit_ok(scheduler, req(3, (MAX_BUDGET, 1), deadline=1.0))
    submit_ok(scheduler, req(4, (MAX_BUDGET, 1), deadline=0.5, priority=1))
    assert one_per_window(scheduler) == [3, 2, 1, 4]


def test_arrival_order_breaks_ties_of_priority_and_deadline():
    scheduler = make(in_flight_per_worker=10)
    for key in (5, 3, 9, 1):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1), deadline=1.0))
    assert one_per_window(scheduler) == [5, 3, 9, 1]


def test_items_within_a_window_follow_queue_order():
    """A small low-priority request submitted first lands after the high-priority one in the same window."""
    scheduler = make()
    submit_ok(scheduler, req(1, (100, 1), priority=1))
    submit_ok(scheduler, req(2, (100, 1), (100, 1), priority=0))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(2, 0), (2, 1), (1, 0)]]


def test_request_larger_than_a_window_is_split_in_order_each_item_once():
    """20 items of 100 tokens, max_items 8: windows of 8, 8 and 4 items, indices in order, none twice.

    The two full windows leave at once; the last (not full) waits for the worker's idle bound.
    """
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, *[(100, 1)] * 20))
    dispatches, _ = scheduler.poll(0.0)
    assert [len(d.items) for d in dispatches] == [8, 8]
    dispatches += scheduler.poll(scheduler.wakeup)[0]
    assert [len(d.items) for d in dispatches] == [8, 8, 4]
    assert [index for d in dispatches for _, index in ids(d)] == list(range(20))
    assert len(scheduler.queue) == 0 and scheduler.queue.tokens == 0


def test_split_request_waits_for_room_and_keeps_item_order_across_completions():
    worker = WorkerState(0, cost)
    scheduler = make(worker, in_flight_per_worker=1)
    submit_ok(scheduler, req(1, *[(600, 1)] * 5))  # one item per window
    seen: list[int] = []
    now = 0.0
    for _ in range(5):
        dispatches, _ = scheduler.poll(now)
        assert len(dispatches) == 1
        assert scheduler.poll(now) == ([], [])  # no room until the window completes
        seen += [index for _, index in ids(dispatches[0])]
        now += 0.01
        scheduler.window_done(dispatches[0].window, now)
    assert seen == [0, 1, 2, 3, 4]
    assert len(scheduler.queue) == 0


# -- 4. capacities --------------------------------------------------------------------------------


def test_window_never_exceeds_the_largest_budget():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, *[(300, 1)] * 7))
    dispatches = poll_until_empty(scheduler)
    assert [len(d.items) for d in dispatches] == [3, 3, 1]  # 900 + 300 > 1024
    assert all(d.tokens <= MAX_BUDGET for d in dispatches)
    assert [d.tokens for d in dispatches] == [900, 900, 300]


def test_window_never_exceeds_max_items():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, *[(4, 1)] * 10))
    dispatches = poll_until_empty(scheduler)
    assert [len(d.items) for d in dispatches] == [8, 2]


def test_window_never_exceeds_max_sequences():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, *[(64, 5)] * 7))  # 3 x 5 = 15 <= 16, 4 x 5 = 20
    dispatches = poll_until_empty(scheduler)
    assert [len(d.items) for d in dispatches] == [3, 3, 1]


def test_item_larger_than_the_largest_budget_is_dispatched_alone():
    """A 2000-token item goes in a window of its own, leaves at once (worker busy) and small items do not join it."""
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker, in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (2000, 1), (4, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    assert dispatches[0].tokens == 2000
    assert dispatches[0].predicted_ms == cost(2000, 1, 0)
    assert queued_ids(scheduler) == [(1, 1)]  # the small one is not full and waits


def test_small_item_ahead_of_an_oversized_one_gets_its_own_window():
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (4, 1), (2000, 1), (8, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0), (1, 2)], [(1, 1)]]


def test_lookahead_lets_a_small_item_behind_a_non_fitting_large_one_join():
    """[600, 600, 100]: the second 600 does not fit, the 100 behind it joins the first window."""
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (600, 1)))
    submit_ok(scheduler, req(2, (600, 1)))
    submit_ok(scheduler, req(3, (100, 1)))
    dispatches = poll_until_empty(scheduler)
    assert [ids(d) for d in dispatches] == [[(1, 0), (3, 0)], [(2, 0)]]


def test_lookahead_can_move_a_later_item_of_a_request_into_an_earlier_window():
    """Documented behaviour: with lookahead, a request's item 2 may leave before its item 1 (different windows)."""
    scheduler = make(in_flight_per_worker=10)
    submit_ok(scheduler, req(1, (800, 1), (400, 1), (100, 1)))
    dispatches = poll_until_empty(scheduler)
    assert [ids(d) for d in dispatches] == [[(1, 0), (1, 2)], [(1, 1)]]


def test_lookahead_scans_that_many_items_past_the_first_that_does_not_fit():
    """lookahead=1: after the first non-fitting item one more is looked at, so a fitting item two behind is left;
    lookahead=2 reaches it."""
    scheduler = make(in_flight_per_worker=10, lookahead=1)
    submit_ok(scheduler, req(1, (600, 1), (600, 1), (600, 1), (100, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert ids(dispatches[0]) == [(1, 0)]
    scheduler = make(in_flight_per_worker=10, lookahead=2)
    submit_ok(scheduler, req(1, (600, 1), (600, 1), (600, 1), (100, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert ids(dispatches[0]) == [(1, 0), (1, 3)]


def test_lookahead_one_scans_one_item_past_the_first_that_does_not_fit():
    scheduler = make(in_flight_per_worker=10, lookahead=1)
    submit_ok(scheduler, req(1, (600, 1)))
    submit_ok(scheduler, req(2, (600, 1)))
    submit_ok(scheduler, req(3, (100, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert ids(dispatches[0]) == [(1, 0), (3, 0)]


def test_item_with_more_sequences_than_max_sequences_is_dispatched_alone():
    scheduler = make(in_flight_per_worker=2)
    submit_ok(scheduler, req(1, (100, 20)))
    dispatches, _ = scheduler.poll(0.0)
    assert all(d.items for d in dispatches), "no window is empty"
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    assert len(scheduler.queue) == 0


def test_window_at_max_sequences_counts_as_full():
    scheduler = make(policy="max_delay", max_delay_ms=5.0)
    submit_ok(scheduler, req(1, (64, 16)))
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]


def test_a_suspect_worker_gets_windows_only_while_every_worker_up_is_suspect():
    """A worker whose readiness probe is overdue (suspect) gets nothing while a trusted worker is up,
    even one that is momentarily full; with the trusted one down, it serves again."""
    suspect, trusted = WorkerState(0, cost, suspect=True), WorkerState(1, cost)
    scheduler = make(suspect, trusted, in_flight_per_worker=2)
    for key in range(1, 5):
        submit_ok(scheduler, req(key, (MAX_BUDGET, 1)))
    dispatches, _ = scheduler.poll(0.0)
    assert [d.worker for d in dispatches] == [1, 1] and len(scheduler.queue) == 2  # the trusted one is full
    scheduler.worker_lost(1)
    dispatches, _ = scheduler.poll(0.0)
    assert [d.worker for d in dispatches] == [0, 0]
