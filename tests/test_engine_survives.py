"""No request stops the engine: any item shape a decoder accepts is encoded or refused with a code
while the engine keeps serving; a request that can never fit the output memory is refused at
admission; an unexpected failure fails only the requests that met it; a loop that cannot go on
marks the engine stopped (and `vitserve serve` exits non-zero)."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vitserve import Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.workers import WindowConfig

# Small windows so that every capacity is easy to exceed: tokens (256), items (4), attention
# sequences (6), and the output memory (512 rows per worker, output_windows=2 and a largest item
# of 2048 tokens).
WINDOW = WindowConfig(min_budget=64, max_budget=256, max_items=4, max_sequences=6)
CONFIG = EngineConfig(window=WINDOW, output_windows=2, max_item_tokens=2048)
CODES = {"invalid_input", "too_large", "deadline_exceeded"}
PATCH_DIM = 3 * 2 * 16 * 16  # the tiny model: 3 channels, temporal patch 2, patch 16


@pytest.fixture(scope="module")
def running():
    """One engine for the whole module, on a loop that runs only while a test drives it."""
    loop = asyncio.new_event_loop()
    engine = Engine(CONFIG)
    loop.run_until_complete(engine.start())
    yield loop, engine
    loop.run_until_complete(engine.close())
    loop.close()


def plain_image() -> np.ndarray:
    return np.full((64, 64, 3), 7, np.uint8)


async def expect_serving(engine: Engine) -> None:
    with await asyncio.wait_for(engine.encode([plain_image()]), 60) as result:
        assert tuple(result.items[0].embeddings.shape) == (64, 128)  # resized up to the processor's minimum: 16×16 patches
    assert engine.health().ready and engine.failure is None


def test_a_video_of_more_sequences_than_a_window_holds_is_encoded_eagerly(running):
    loop, engine = running

    async def run() -> None:
        video = np.zeros((60, 32, 32, 3), np.uint8)  # 30 temporal patches of 2×2: 120 tokens, 30 sequences
        with await asyncio.wait_for(engine.encode([video]), 60) as result:
            assert tuple(result.items[0].embeddings.shape) == (30, 128)
        await expect_serving(engine)

    loop.run_until_complete(run())


sides = st.one_of(st.integers(1, 40), st.integers(28, 300))  # some below the processor's minimum
images = st.tuples(sides, sides).map(lambda hw: np.zeros((*hw, 3), np.uint8))
videos = st.tuples(st.integers(1, 60), st.integers(1, 64), st.integers(1, 64)).map(
    lambda thw: np.zeros((*thw, 3), np.uint8))
even = st.integers(1, 10).map(lambda half: 2 * half)
grids = st.one_of(st.tuples(st.integers(1, 12), even, even),  # valid, up to 4800 tokens (over the item limit)
                  st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 5)))  # mostly not
patches = grids.map(lambda g: (np.zeros((max(g[0] * g[1] * g[2], 0), PATCH_DIM), np.float32), g))
items = st.one_of(images, videos, patches)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.lists(items, min_size=1, max_size=6),
       deadline_ms=st.one_of(st.none(), st.floats(0.0, 500.0)), priority=st.integers(-5, 5))
def test_any_item_shape_is_encoded_or_refused_with_a_code_and_the_engine_keeps_serving(
        running, request, deadline_ms, priority):
    loop, engine = running

    async def run() -> None:
        try:
            admitted = engine.admit(request)
            result = await asyncio.wait_for(engine.encode(request, deadline_ms, priority), 60)
        except EngineError as err:
            assert err.code in CODES, err
            event(f"refused: {err.code}")
        else:
            with result:
                assert [item.embeddings.shape[0] for item in result.items] == [a.tokens // 4 for a in admitted]
            event("encoded")
        await expect_serving(engine)
        await asyncio.sleep(0)  # releases run on the loop, as garbage collection may call them from anywhere
        assert engine.stats()["requests_open"] == 0

    loop.run_until_complete(run())


def test_a_request_whose_outputs_can_never_fit_is_refused_at_admission(running):
    loop, engine = running

    async def run() -> None:
        sent = engine.stats()["windows_sent"]
        too_many = [np.full((512, 512, 3), i, np.uint8) for i in range(3)]  # 3 × 256 rows > 512 rows
        with pytest.raises(EngineError) as info:
            await engine.encode(too_many)
        assert info.value.code == "too_large" and "output_windows=2" in info.value.message
        assert engine.stats()["windows_sent"] == sent, "refused before any work was done"
        with await engine.encode(too_many[:2]) as result:  # what fits still runs
            assert [item.embeddings.shape[0] for item in result.items] == [256, 256]

    loop.run_until_complete(run())


def test_a_request_stalled_by_results_held_elsewhere_is_overloaded_not_too_large(running):
    """Rows held by another request's unreleased result stall the second item of a request whose first
    item is done: it would fit once that result is released, so the answer is `overloaded`, with a retry
    hint, and not `too_large` (its done item's rows are held already, not still to come)."""
    loop, engine = running

    async def run() -> None:
        big = [np.full((512, 512, 3), i, np.uint8) for i in range(3)]  # 256 rows each, of 512
        held = await engine.encode(big[:1])
        try:
            with pytest.raises(EngineError) as info:
                await asyncio.wait_for(engine.encode(big[1:]), 60)
            assert info.value.code == "overloaded" and info.value.retry_after_ms is not None, info.value
        finally:
            held.release()
        with await engine.encode(big[1:]) as result:  # with the rows back, it runs
            assert [item.embeddings.shape[0] for item in result.items] == [256, 256]
        await expect_serving(engine)

    loop.run_until_complete(run())


def test_an_unexpected_scheduling_failure_fails_only_the_request_at_fault(running, monkeypatch):
    loop, engine = running
    poll = type(engine.scheduler).poll
    victims = set()

    def poll_failing_on_a_video(self, now):
        for item in self.queue:
            if item.sequences > 1:
                victims.add(item.request.key)
                raise RuntimeError("a scheduling bug")
        return poll(self, now)

    async def run() -> None:
        monkeypatch.setattr(type(engine.scheduler), "poll", poll_failing_on_a_video)
        video = np.zeros((4, 64, 64, 3), np.uint8)
        bad, good = engine.encode([video]), engine.encode([plain_image()])
        outcomes = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 60)
        assert isinstance(outcomes[0], EngineError) and outcomes[0].code == "worker_failed"
        assert "a scheduling bug" in outcomes[0].message
        outcomes[1].release()
        assert engine.stats()["internal_errors"] >= 1 and len(victims) == 1
        await expect_serving(engine)

    loop.run_until_complete(run())


def test_a_loop_that_cannot_go_on_stops_the_engine_and_says_so():
    async def run() -> None:
        async with Engine(EngineConfig(window=WINDOW)) as engine:
            def broken(now):
                raise RuntimeError("the scheduler is broken")

            engine.scheduler.poll = broken  # fails with nothing queued: failing requests cannot cure it
            engine._poke.set()
            await asyncio.wait_for(engine.stopped.wait(), 10)
            assert "the scheduler is broken" in repr(engine.failure)
            with pytest.raises(EngineError) as info:
                await engine.encode([plain_image()])
            assert info.value.code == "worker_failed" and "start a new one" in info.value.message
            assert not engine.health().ready

    asyncio.run(run())


def test_serve_exits_non_zero_when_the_engine_stops_by_itself(tmp_path, monkeypatch):
    """`vitserve serve` must not stay up answering `shutting_down`: a supervisor restarts it."""
    from vitserve.engine.serve import serve
    from vitserve.scheduler import Scheduler

    def broken(self, now):
        raise RuntimeError("the scheduler is broken")

    monkeypatch.setattr(Scheduler, "poll", broken)
    socket = tmp_path / "engine.sock"
    frozen = gc.get_freeze_count()
    code = asyncio.run(asyncio.wait_for(serve(EngineConfig(window=WINDOW), f"ipc://{socket}"), 120))
    assert code == 1
    assert not socket.exists()
    # serve() in a process that is not vitserve's own (here pytest's) leaves its collector alone
    assert gc.get_freeze_count() == frozen
