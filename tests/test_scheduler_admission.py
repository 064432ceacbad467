"""Scheduler admission: early deadline_exceeded, overloaded and too_large at the queue's bounds."""

from __future__ import annotations

from scheduler_fakes import MAX_BUDGET, cost, ids, make, queued_ids, req, submit_ok

from vitserve.scheduler import Failure, WorkerState


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
