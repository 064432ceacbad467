"""The scheduler's rules on a fake clock and fake cost models: flushing, policies, ordering,
capacities, early deadline failure, overload, worker choice, cancel and worker loss, config
validation, and a property test over random request streams.

Times are scheduler-clock seconds (`now`, `busy_until`, deadlines); predictions are ms.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vitserve.scheduler import (
    POLICIES,
    Dispatch,
    Failure,
    Request,
    Scheduler,
    SchedulerConfig,
    WorkerState,
    deadline_at,
)
from vitserve.workers import Capacities

CAPS = Capacities(budgets=(256, 512, 1024), max_items=8, max_sequences=16, merge_factor=4)
MAX_BUDGET = CAPS.max_budget


def cost(tokens: int, sequences: int, square_tokens: int) -> float:
    """The default fake cost model: 1 ms launch plus 1 ms per 1000 tokens."""
    return 1.0 + tokens / 1000


def make(*workers: WorkerState, caps: Capacities = CAPS, **config) -> Scheduler:
    if not workers:
        workers = (WorkerState(0, cost),)
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


# -- 3. ordering ----------------------------------------------------------------------------------


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


# -- 4b. property over random request streams -----------------------------------------------------

shapes_st = st.lists(
    st.tuples(st.one_of(st.integers(1, MAX_BUDGET), st.integers(MAX_BUDGET + 1, 3000)), st.integers(1, 4)),
    min_size=1, max_size=12,
)
op_st = st.one_of(
    st.tuples(st.just("submit"), shapes_st, st.integers(0, 2),
              st.one_of(st.none(), st.floats(0.05, 8.0), st.floats(8.0, 100.0))),  # deadline ms
    st.tuples(st.just("advance"), st.floats(0.0, 20.0)),
    st.tuples(st.just("poll")),
    st.tuples(st.just("done"), st.integers(0, 1000)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("lose"), st.integers(0, 1000)),
)
worker_st = st.tuples(st.floats(0.1, 5.0), st.floats(0.0, 0.01), st.floats(0.0, 50.0))  # ms, ms/token, busy_until ms


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    in_flight=st.integers(1, 3),
    fail_early=st.booleans(),
    lookahead=st.sampled_from([1, 2, 4, 64]),
    max_items_queued=st.integers(5, 60),
    max_tokens_queued=st.integers(3000, 40000),
    workers=st.lists(worker_st, min_size=1, max_size=3),
    ops=st.lists(op_st, max_size=80),
)
def test_random_streams_dispatch_every_item_once_within_capacities(
    policy, in_flight, fail_early, lookahead, max_items_queued, max_tokens_queued, workers, ops,
):
    """Every admitted item is dispatched exactly once, or removed by cancel, or its request failed;
    no item is dispatched twice or after its request failed/was rejected; no item is lost. (A request
    may be failed early while some of its items are already in flight: see
    test_fail_early_can_fail_a_request_whose_other_items_are_already_in_flight.) Every
    window is non-empty and within max budget (unless one oversized item), max_items and max_sequences;
    no window goes to a lost worker or past the in-flight limit; queued items always drain."""
    config = dict(policy=policy, in_flight_per_worker=in_flight, fail_early=fail_early, lookahead=lookahead,
                  max_queued_items=max_items_queued, max_queued_tokens=max_tokens_queued, max_delay_ms=3.0)
    states = [WorkerState(i, (lambda a, b: lambda t, s, q: a + b * t)(a, b), busy_until=busy / 1e3)
              for i, (a, b, busy) in enumerate(workers)]
    scheduler = make(*states, **config)
    now = 0.0
    next_key = 0
    requests: dict[int, Request] = {}
    rejected: set[int] = set()  # submit answered a Failure
    failed: set[int] = set()  # poll answered deadline_exceeded
    dispatched: dict[tuple[int, int], int] = {}  # item -> window
    cancelled: set[tuple[int, int]] = set()
    in_flight_windows: list[Dispatch] = []
    lost_workers: set[int] = set()

    def check_poll(now: float) -> None:
        queued_before = {(item.request.key, item.index) for item in scheduler.queue}
        dispatches, failures = scheduler.poll(now)
        for failure in failures:
            assert failure.code == "deadline_exceeded" and fail_early
            key = failure.request.key
            assert key not in failed and key not in rejected
            failed.add(key)
            event("poll failed a request early")
            if any(k == key for k, _ in dispatched):
                event("request failed early with items already dispatched")
            assert not any(item.request.key == key for item in scheduler.queue)
        for dispatch in dispatches:
            assert dispatch.items, "a window is never empty"
            tokens = sum(item.tokens for item in dispatch.items)
            sequences = sum(item.sequences for item in dispatch.items)
            assert dispatch.tokens == tokens
            if len(dispatch.items) > 1 or tokens <= MAX_BUDGET:
                assert tokens <= MAX_BUDGET
                assert sequences <= CAPS.max_sequences
            assert len(dispatch.items) <= CAPS.max_items
            worker = scheduler.workers[dispatch.worker]
            assert dispatch.worker not in lost_workers and worker.ready
            assert len(worker.in_flight) <= in_flight
            for item in dispatch.items:
                key = (item.request.key, item.index)
                assert key in queued_before, "only queued items are dispatched"
                assert key not in dispatched, "an item is dispatched at most once"
                assert item.request.key not in failed and item.request.key not in rejected
                dispatched[key] = dispatch.window
            in_flight_windows.append(dispatch)
            if tokens > MAX_BUDGET:
                event("oversized item dispatched alone")
        assert not any((item.request.key, item.index) in dispatched for item in scheduler.queue)

    for op in ops:
        kind = op[0]
        if kind == "submit":
            _, shapes, priority, deadline_ms = op
            request = Request(next_key, priority, deadline_at(now, deadline_ms), now, shapes)
            next_key += 1
            before = (len(scheduler.queue), scheduler.queue.tokens)
            failure = scheduler.submit(request, now)
            requests[request.key] = request
            if failure is not None:
                assert failure.request is request
                assert failure.code in ("overloaded", "deadline_exceeded", "too_large")
                if failure.code == "overloaded":
                    assert failure.retry_after_ms is not None and failure.retry_after_ms >= 0
                elif failure.code == "deadline_exceeded":
                    assert fail_early
                rejected.add(request.key)
                event(f"submit answered {failure.code}")
                assert (len(scheduler.queue), scheduler.queue.tokens) == before
            else:
                assert len(scheduler.queue) == before[0] + len(shapes)
            assert len(scheduler.queue) <= max_items_queued
            assert scheduler.queue.tokens <= max_tokens_queued
            check_poll(now)
        elif kind == "advance":
            now += op[1] / 1e3
        elif kind == "poll":
            check_poll(now)
        elif kind == "done" and in_flight_windows:
            dispatch = in_flight_windows.pop(op[1] % len(in_flight_windows))
            assert scheduler.window_done(dispatch.window, now) is dispatch
            check_poll(now)
        elif kind == "cancel" and requests:
            key = sorted(requests)[op[1] % len(requests)]
            queued = [(item.request.key, item.index) for item in scheduler.queue if item.request.key == key]
            assert scheduler.cancel(key) == bool(queued)
            cancelled.update(queued)
            if queued:
                event("cancel removed queued items")
            assert not any(item.request.key == key for item in scheduler.queue)
        elif kind == "lose":
            alive = [w for w in scheduler.workers.values() if w.ready]
            if len(alive) > 1:
                worker = alive[op[1] % len(alive)]
                expected = [d for d in in_flight_windows if d.worker == worker.id]
                lost = scheduler.worker_lost(worker.id)
                assert sorted(d.window for d in lost) == sorted(d.window for d in expected)
                lost_workers.add(worker.id)
                event("worker lost" + (" with windows in flight" if lost else ""))
                in_flight_windows[:] = [d for d in in_flight_windows if d.worker != worker.id]

    # Drain: complete everything and follow wakeups until the queue is empty.
    for _ in range(500):
        while in_flight_windows:
            scheduler.window_done(in_flight_windows.pop(0).window, now)
        check_poll(now)
        if not len(scheduler.queue) and not in_flight_windows:
            break
        if not in_flight_windows:
            assert scheduler.wakeup is not None, "items queued, nothing in flight, and no wakeup: they would hang"
        if scheduler.wakeup is not None:
            now = max(now, scheduler.wakeup) + 1e-6
    assert len(scheduler.queue) == 0 and scheduler.queue.tokens == 0

    for key, request in requests.items():
        for index in range(len(request.shapes)):
            item = (key, index)
            if key in rejected:
                assert item not in dispatched and item not in cancelled
            elif item in dispatched:
                assert item not in cancelled
            else:
                # never dispatched: it was cancelled or its request failed early, never lost
                assert item in cancelled or key in failed, f"item {item} was lost"


# -- 5. early deadline_exceeded ---------------------------------------------------------------------


def test_submit_fails_a_request_whose_item_alone_cannot_meet_the_deadline():
    """1000 tokens take 2 ms alone; a 1.5 ms deadline fails at once with deadline_exceeded, nothing queued."""
    scheduler = make()
    request = req(1, (1000, 1), deadline=0.0015)
    failure = scheduler.submit(request, 0.0)
    assert isinstance(failure, Failure)
    assert failure.code == "deadline_exceeded" and failure.request is request
    assert len(scheduler.queue) == 0 and scheduler.queue.tokens == 0
    assert scheduler.poll(0.0) == ([], [])


def test_submit_fails_the_whole_request_when_one_item_is_hopeless():
    scheduler = make()
    submit_ok(scheduler, req(0, (8, 1)))
    failure = scheduler.submit(req(1, (4, 1), (1000, 1), deadline=0.0015), 0.0)
    assert failure is not None and failure.code == "deadline_exceeded"
    assert queued_ids(scheduler) == [(0, 0)]
    assert scheduler.queue.tokens == 8


def test_submit_uses_the_fastest_worker_for_the_alone_time():
    """Alone on the fast worker 1000 tokens take 1.1 ms: a 1.5 ms deadline is admitted
    although the slow worker would need 2 ms."""
    scheduler = make(WorkerState(0, cost), WorkerState(1, lambda t, s, q: 0.1 + t / 1000))
    assert scheduler.submit(req(1, (1000, 1), deadline=0.0015), 0.0) is None


def test_poll_fails_a_queued_request_when_it_becomes_hopeless_and_wakes_up_for_it():
    """The worker has no free slot; the item (2 ms alone) with a 10 ms deadline fails at deadline - 2 ms."""
    worker = WorkerState(0, cost, free_rows=0)
    scheduler = make(worker)
    request = req(1, (1000, 1), deadline=0.010)
    submit_ok(scheduler, request)
    assert scheduler.poll(0.0) == ([], [])
    doomed_at = 0.010 - 2.0 / 1e3
    assert scheduler.wakeup == doomed_at
    assert scheduler.poll(doomed_at - 1e-6) == ([], [])
    dispatches, failures = scheduler.poll(doomed_at)
    assert dispatches == []
    assert [(f.request, f.code) for f in failures] == [(request, "deadline_exceeded")]
    assert len(scheduler.queue) == 0
    assert scheduler.wakeup is None


def test_wakeup_is_the_earlier_of_window_departure_and_a_request_turning_hopeless():
    """Departure first: the idle bound 0.999 s beats the item's hopeless time 1.998 s.
    Hopeless first (max_delay holds the window 50 ms): wakeup is deadline - alone = 8 ms, and polling then fails it."""
    worker = WorkerState(0, cost, busy_until=1.0)
    scheduler = make(worker, idle_lead_ms=1.0)
    submit_ok(scheduler, req(1, (1000, 1), deadline=2.0))  # 2 ms alone
    assert scheduler.poll(0.0) == ([], [])
    assert scheduler.wakeup == 1.0 - 1.0 / 1e3

    scheduler = make(policy="max_delay", max_delay_ms=50.0)
    request = req(1, (1000, 1), deadline=0.010)
    submit_ok(scheduler, request)
    assert scheduler.poll(0.0) == ([], [])
    assert scheduler.wakeup == 0.010 - 2.0 / 1e3
    dispatches, failures = scheduler.poll(scheduler.wakeup)
    assert dispatches == [] and [f.request for f in failures] == [request]


def test_fail_early_false_fails_nothing_early():
    worker = WorkerState(0, cost, free_rows=0)
    scheduler = make(worker, fail_early=False)
    assert scheduler.submit(req(1, (1000, 1), deadline=0.0015), 0.0) is None  # hopeless, admitted anyway
    assert scheduler.poll(10.0) == ([], [])  # long past its deadline, still not failed
    assert scheduler.wakeup is None
    worker.free_rows = 1 << 20
    dispatches, failures = scheduler.poll(10.0)
    assert failures == [] and [ids(d) for d in dispatches] == [[(1, 0)]]


def test_fail_early_can_fail_a_request_whose_other_items_are_already_in_flight():
    """Documented (questionable) behaviour: a split request whose first window is in flight is failed early
    when its still-queued item can no longer make the deadline; the engine must drop the in-flight result."""
    worker = WorkerState(0, cost)
    scheduler = make(worker, in_flight_per_worker=1)
    request = req(1, (MAX_BUDGET, 1), (MAX_BUDGET, 1), deadline=0.010)
    submit_ok(scheduler, request)
    dispatches, _ = scheduler.poll(0.0)
    assert [ids(d) for d in dispatches] == [[(1, 0)]]
    _, failures = scheduler.poll(0.009)  # item 1 needs 2.024 ms alone: hopeless from 7.976 ms on
    assert [f.request.key for f in failures] == [1]
    assert len(scheduler.queue) == 0
    assert dispatches[0].window in worker.in_flight  # item 0 still runs


def test_polling_at_the_hopeless_wakeup_fails_the_request():
    worker = WorkerState(0, lambda t, s, q: 3.0, free_rows=0)
    scheduler = make(worker)
    submit_ok(scheduler, req(1, (100, 1), deadline=0.014))
    assert scheduler.poll(0.0) == ([], [])
    wakeup = scheduler.wakeup
    _, failures = scheduler.poll(wakeup)
    assert [f.code for f in failures] == ["deadline_exceeded"]


# -- 6. overloaded ----------------------------------------------------------------------------------


def test_over_max_queued_items_is_overloaded_and_queue_unchanged():
    worker = WorkerState(0, cost, free_rows=0)
    scheduler = make(worker, max_queued_items=4)
    submit_ok(scheduler, req(1, *[(100, 1)] * 3))
    request = req(2, (100, 1), (100, 1))
    failure = scheduler.submit(request, 0.0)
    assert failure is not None and failure.code == "overloaded" and failure.request is request
    assert failure.retry_after_ms is not None and failure.retry_after_ms > 0
    assert queued_ids(scheduler) == [(1, 0), (1, 1), (1, 2)] and scheduler.queue.tokens == 300
    submit_ok(scheduler, req(3, (100, 1)))  # exactly at the limit is fine


def test_over_max_queued_tokens_is_overloaded_and_queue_unchanged():
    worker = WorkerState(0, cost, free_rows=0)
    scheduler = make(worker, max_queued_tokens=1000)
    submit_ok(scheduler, req(1, (600, 1)))
    failure = scheduler.submit(req(2, (401, 1)), 0.0)
    assert failure is not None and failure.code == "overloaded"
    assert failure.retry_after_ms is not None and failure.retry_after_ms > 0
    assert queued_ids(scheduler) == [(1, 0)] and scheduler.queue.tokens == 600
    submit_ok(scheduler, req(3, (400, 1)))  # 1000 tokens exactly


def test_overloaded_queue_has_room_again_after_dispatch():
    worker = WorkerState(0, cost, busy_until=10.0)
    scheduler = make(worker, max_queued_items=2)
    submit_ok(scheduler, req(1, (MAX_BUDGET, 1), (MAX_BUDGET, 1)))
    assert scheduler.submit(req(2, (4, 1)), 0.0).code == "overloaded"
    dispatches, _ = scheduler.poll(0.0)  # both windows are full: they leave
    assert len(dispatches) == 2 and len(scheduler.queue) == 0
    submit_ok(scheduler, req(2, (4, 1)))


def test_overloaded_retry_hint_grows_with_the_queue():
    worker = WorkerState(0, cost, free_rows=0)
    small = make(worker, max_queued_items=2)
    submit_ok(small, req(1, (100, 1), (100, 1)))
    large = make(worker, max_queued_items=2)
    submit_ok(large, req(1, (1000, 1), (1000, 1)))
    assert small.submit(req(2, (4, 1)), 0.0).retry_after_ms < large.submit(req(2, (4, 1)), 0.0).retry_after_ms


def test_request_exceeding_the_queue_bound_alone_gets_no_zero_retry_hint():
    scheduler = make(max_queued_items=2)
    failure = scheduler.submit(req(1, *[(4, 1)] * 3), 0.0)
    assert failure is not None
    assert failure.code == "too_large" or failure.retry_after_ms > 0


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
