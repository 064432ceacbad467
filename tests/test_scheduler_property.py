"""A property test of the scheduler over random request streams, clock steps, completions, cancels
and lost workers: every item is dispatched once or its request failed, within all capacities."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scheduler_fakes import CAPS, MAX_BUDGET, make

from vitserve.scheduler import POLICIES, Dispatch, Request, WorkerState, deadline_at


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
