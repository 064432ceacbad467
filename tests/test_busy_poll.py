"""Busy polling (EngineConfig.busy_poll_ms): the engine's loop polls while a window's reply is due
(engine/busy_poll.py), the worker's loop near its window's predicted end and after its last reply
(workers/running.Pauses). Polling must end on its own, leave the loop's other work running, and
change no result."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from vitserve import Engine, EngineConfig
from vitserve.engine.busy_poll import BusyPolling
from vitserve.workers.running import POLL_LEAD_SHARE, LearnedDue, Pauses


# -- the setting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 1001, True, "2", float("nan")])
def test_a_bad_busy_poll_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="busy_poll_ms"):
        EngineConfig(model="random:tiny", busy_poll_ms=value)


def test_busy_polling_is_on_for_gpus_and_off_where_a_worker_needs_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert EngineConfig(model="random:tiny", devices=("cuda:0",)).busy_poll_s == 0.002
    assert EngineConfig(model="random:tiny", devices=("cpu",)).busy_poll_s == 0.0
    assert EngineConfig(model="random:tiny", devices=("cuda:0", "cpu")).busy_poll_s == 0.0
    assert EngineConfig(model="random:tiny", devices=("cpu",), busy_poll_ms=0.5).busy_poll_s == 0.0005
    assert EngineConfig(model="random:tiny", devices=("cuda:0",), busy_poll_ms=0).busy_poll_s == 0.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))  # a small host: its clients need them
    assert EngineConfig(model="random:tiny", devices=("cuda:0",)).busy_poll_s == 0.0
    assert EngineConfig(model="random:tiny", devices=("cuda:0",), busy_poll_ms=1).busy_poll_s == 0.001


# -- the worker's pauses -------------------------------------------------------------------------
def test_a_worker_sleeps_between_checks_until_its_window_is_nearly_due_and_polls_until_past_it():
    # Bounds tens of milliseconds wide, so that this test's own steps do not cross them on a loaded
    # machine (30 µs did, once, in CI)
    busy, sleep = 0.2, 0.05
    pauses = Pauses(busy, sleep)
    now = time.perf_counter()
    assert pauses.running(now + 10.0) == sleep  # far from its end
    assert 0 < pauses.running(now + POLL_LEAD_SHARE * busy + 0.02) <= 0.02  # wakes where polling begins
    assert pauses.running(now + POLL_LEAD_SHARE * busy / 2) == 0.0  # nearly due: polls
    assert pauses.running(now - busy / 2) == 0.0  # late, within busy_poll of its prediction: polls
    assert pauses.running(now - 2 * busy) == sleep  # long past: the prediction was wrong, sleeps again


def test_a_worker_without_busy_polling_always_sleeps():
    pauses = Pauses(0.0, 100e-6)
    now = time.perf_counter()
    assert {pauses.running(now + d) for d in (-1.0, 0.0, 1e-4, 1.0)} == {100e-6}
    pauses.idle()
    assert not pauses.idle_polling()


def test_a_worker_polls_for_a_while_after_its_last_reply_then_blocks():
    pauses = Pauses(0.05, 100e-6)
    assert not pauses.idle_polling()  # never ran a window: blocks
    pauses.idle()
    assert pauses.idle_polling()
    time.sleep(0.06)
    assert not pauses.idle_polling()


def test_a_window_is_due_after_the_windows_queued_before_it():
    pauses = Pauses(0.002, 100e-6)
    running = []
    first = pauses.due(SimpleNamespace(received=10.0, due=0.0, due_from=(0.0, 0.0)), 4.0, running)
    assert first.due == pytest.approx(10.004)  # from its receipt (the host's work on it is part of its time)
    running.append(first)
    second = pauses.due(SimpleNamespace(received=10.001, due=0.0, due_from=(0.0, 0.0)), 3.0, running)
    assert second.due == pytest.approx(first.due + 0.003)  # behind the first
    late = pauses.due(SimpleNamespace(received=20.0, due=0.0, due_from=(0.0, 0.0)), 1.0, running)
    assert late.due == pytest.approx(20.001)  # the ones before it ended long ago


def test_predictions_that_are_off_are_corrected_by_what_the_windows_took():
    learned = LearnedDue()
    assert learned.due(10.0, 0.004) == pytest.approx(10.004)  # nothing seen yet: the prediction
    for start in range(30):  # the windows take half their predicted time (a cost model measured too slow)
        learned.learn(float(start), 0.004, start + 0.002)
    assert learned.due(100.0, 0.004) == pytest.approx(100.002, abs=1e-4)
    for start in range(300):  # an absurd observation is bounded, never a due in the past or hours away
        learned.learn(float(start), 0.004, start + 100.0)
    assert learned.due(0.0, 0.004) <= 0.004 * LearnedDue.BOUNDS[1] + 1e-9


def test_the_learned_due_comes_before_most_of_the_times_seen():
    learned = LearnedDue()
    rng = np.random.default_rng(0)
    times = rng.normal(0.004, 0.0004, 2000)  # 4 ms windows with 10 % jitter, predicted at 4 ms
    for start, took in enumerate(times):
        learned.learn(float(start), 0.004, start + took)
    early = np.mean(times < learned.due(0.0, 0.004))
    assert 0.02 < early < 0.3  # polling that begins there finds most replies still to come


def test_a_worker_polls_earlier_once_its_windows_end_before_their_predictions():
    pauses = Pauses(0.002, 100e-6)
    for _ in range(30):
        run = pauses.due(SimpleNamespace(received=time.perf_counter(), due=0.0, due_from=(0.0, 0.0)), 1.0, [])
        pauses.finished(run)  # done at once: far sooner than its 1 ms
    run = pauses.due(SimpleNamespace(received=50.0, due=0.0, due_from=(0.0, 0.0)), 1000.0, [])
    assert run.due < 50.0 + 0.5  # a 1 s prediction now counts for well under half of it


async def assert_stops(polling: BusyPolling, after_s: float) -> None:
    """`after_s` from now, `polling` no longer turns the loop; then it is closed."""
    await asyncio.sleep(after_s)
    turns = polling.turns
    await asyncio.sleep(0.01)
    assert polling.turns == turns
    polling.close()


# -- the engine's loop ---------------------------------------------------------------------------
def test_the_loop_polls_while_a_reply_is_due_and_stops_when_it_comes():
    async def scenario():
        loop = asyncio.get_running_loop()
        polling = BusyPolling(0.2)
        began = loop.time()
        polling.expect(1, began, began + 0.1)  # polls from 50 ms before it is due until 200 ms after
        await asyncio.sleep(0.005)
        assert polling.turns == 0  # not yet: the loop slept
        await asyncio.sleep(began + 0.06 - loop.time())
        ticks = 0
        began = loop.time()
        while loop.time() - began < 0.03:  # the loop's other work goes on meanwhile
            await asyncio.sleep(0.001)
            ticks += 1
        assert polling.turns > ticks  # it polled: turns of the loop that did not wait
        assert ticks > 10
        polling.arrived(1, loop.time())
        await assert_stops(polling, after_s=0.002)  # with the reply

    asyncio.run(scenario())


def test_polling_for_a_reply_that_never_comes_ends_busy_poll_after_it_was_due():
    async def scenario():
        loop = asyncio.get_running_loop()
        polling = BusyPolling(0.02)
        polling.expect(7, loop.time(), loop.time())  # due now: polls at once, gives up 20 ms later
        await asyncio.sleep(0.01)
        assert polling.turns > 0
        await assert_stops(polling, after_s=0.03)

    asyncio.run(scenario())


def test_the_loop_polls_for_a_while_once_idle_then_sleeps():
    async def scenario():
        polling = BusyPolling(0.02)
        polling.idle()  # the last reply came: a sequential client's next request may follow
        await asyncio.sleep(0.01)
        assert polling.turns > 0
        await assert_stops(polling, after_s=0.03)

    asyncio.run(scenario())


def test_the_loop_polls_earlier_once_replies_come_before_their_predictions():
    async def scenario():
        loop = asyncio.get_running_loop()
        polling = BusyPolling(0.004)
        for window in range(30):  # replies at a quarter of their predicted time
            now = loop.time()
            polling.expect(window, now - 0.01, now + 0.03)
            polling.arrived(window, now)
        await asyncio.sleep(0.01)  # (the idle polling, and the timers of those windows, run out)
        turns = polling.turns
        polling.expect(99, loop.time(), loop.time() + 0.2)  # predicted in 200 ms: due in about 50
        await asyncio.sleep(0.1)
        assert polling.turns > turns  # it polled well before the prediction
        polling.arrived(99, loop.time())
        polling.close()

    asyncio.run(scenario())


def test_every_reply_that_comes_when_due_finds_the_loop_polling():
    """Under uvloop, whose timers count whole milliseconds and may fire before their time."""
    import uvloop

    async def scenario():
        loop = asyncio.get_running_loop()
        polling = BusyPolling(0.02)  # polls from 5 ms before each reply is due until 20 ms after
        rng = np.random.default_rng(1)
        for window in range(40):
            sent = loop.time()
            due = sent + 0.010 + rng.uniform(0, 0.001)  # its polling begins at a fraction of a millisecond
            polling.expect(window, sent, due)
            await asyncio.sleep(max(due - loop.time(), 0))
            polling.arrived(window, loop.time())
            await asyncio.sleep(0.002)  # the polling ends with the reply: the next one's starts from its timer
        assert polling.replies == 40
        assert polling.replies_polled == 40
        polling.close()

    uvloop.run(scenario())


def test_no_busy_poll_no_polling():
    async def scenario():
        polling = BusyPolling(0.0)
        polling.expect(1, asyncio.get_running_loop().time(), asyncio.get_running_loop().time())
        polling.idle()
        await asyncio.sleep(0.01)
        assert polling.turns == 0

    asyncio.run(scenario())


# -- end to end ------------------------------------------------------------------------------------
def test_results_with_busy_polling_equal_those_without():
    rng = np.random.default_rng(3)
    items = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)]

    async def encode_all(busy_poll_ms: float) -> tuple[list[np.ndarray], int]:
        async with Engine(EngineConfig(model="random:tiny", busy_poll_ms=busy_poll_ms)) as engine:
            outputs = []
            for _ in range(3):  # sequential: each request's worker polls after the last reply
                for item in items:
                    with await engine.encode([item]) as result:
                        outputs.append(result.items[0].embeddings.numpy().copy())
            together = await asyncio.gather(*(engine.encode([item]) for item in items * 2))
            for result in together:
                with result:
                    outputs.append(result.items[0].embeddings.numpy().copy())
            return outputs, engine._busy_polling.turns

    polled, turns = asyncio.run(encode_all(5.0))
    slept, no_turns = asyncio.run(encode_all(0.0))
    assert turns > 0 and no_turns == 0
    sequential = 3 * len(items)  # one item per window: bit-equal; windows of several may pack otherwise
    for a, b in zip(polled[:sequential], slept[:sequential], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(polled[sequential:], slept[sequential:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
