"""DoomClock: the requests that can no longer meet their deadlines, found without scanning the
queue at every poll, are exactly those a scan of the queue finds."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from vitserve.scheduler.doomed import SPARE_ENTRIES, DoomClock
from vitserve.scheduler.queue import Request, RequestQueue


def hopeless_by_scan(queue: RequestQueue, now: float) -> set[int]:
    return {item.request.key for item in queue if now >= item.request.deadline - item.alone_ms / 1e3}


# each step: submit (deadline s or None, alone ms per item), dispatch the queue's head items, or advance the clock
steps = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.one_of(st.none(), st.floats(0.0, 2.0)), st.lists(st.floats(0.0, 900.0), min_size=1,
                                                                                   max_size=4)),
    st.tuples(st.just("dispatch"), st.integers(1, 5)),
    st.tuples(st.just("advance"), st.floats(0.0, 0.5)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_due_requests_are_the_ones_a_scan_finds(plan):
    queue, clock, now, keys = RequestQueue(), DoomClock(), 0.0, iter(range(1, 10**6))
    for step in plan:
        if step[0] == "submit":
            _, deadline_s, alone = step
            deadline = math.inf if deadline_s is None else now + deadline_s
            request = Request(next(keys), 0, deadline, now, [(4, 1)] * len(alone))
            items = queue.add(request)
            for item, ms in zip(items, alone):
                item.alone_ms = ms
            clock.watch(items)
        elif step[0] == "dispatch":
            queue.dispatched(list(queue)[:step[1]])
        else:
            now += step[1]
        expected = hopeless_by_scan(queue, now)
        found = {request.key for request in clock.due(now, queue)}
        assert found == expected
        for key in found:  # as the scheduler does: their items leave the queue
            queue.remove(queue.of_request(key))
        assert len(clock._heap) <= 2 * len(queue) + SPARE_ENTRIES + 4
        earliest = min((i.request.deadline - i.alone_ms / 1e3 for i in queue), default=math.inf)
        assert clock.next_at() <= earliest  # the scheduler wakes up no later than the first doom


def test_a_request_whose_slow_item_left_is_due_later_not_failed():
    queue, clock = RequestQueue(), DoomClock()
    request = Request(1, 0, 1.0, 0.0, [(4, 1), (4, 1)])
    slow, fast = queue.add(request)
    slow.alone_ms, fast.alone_ms = 800.0, 100.0
    clock.watch([slow, fast])
    assert clock.next_at() == 1.0 - 0.8
    queue.dispatched([slow])
    assert clock.due(0.5, queue) == []  # only the fast item is queued: hopeless from 0.9
    assert abs(clock.next_at() - 0.9) < 1e-9
    assert [r.key for r in clock.due(0.95, queue)] == [1]
