"""Worker liveness by heartbeat, on the CPU with real worker processes: a stopped (SIGSTOP) worker
is alive but runs nothing, so only its missing heartbeat gives it away. It is soon not ready, its
windows are retried or fail by their deadlines (not after the window timeout), it is restarted,
and the mappings of its old slabs go; a worker that resumes within the grace is no fault."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from vitserve import Engine, EngineConfig
from vitserve.cli import build_parser
from vitserve.engine import EngineError
from vitserve.engine.liveness import HUNG_AFTER_BEATS
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image
from vitserve.scheduler import SchedulerConfig
from vitserve.workers import WindowConfig

HEARTBEAT_S = 0.5
# The last beat came up to a beat before the stop; then the grace, a poll of the receive loop (a
# beat at most) and a beat more for a busy host.
NOTICED_WITHIN_S = (HUNG_AFTER_BEATS + 3) * HEARTBEAT_S
DEADLINE_S = 3.0  # later than the hang is noticed: what fails the request then is its deadline
MARGIN_S = 1.0
WINDOW = WindowConfig(min_budget=64, max_budget=512)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
BIG = 1536  # a 96×96-patch image: one eager window of a second or more on the CPU


def image(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def config(**changes) -> EngineConfig:
    return EngineConfig(**{"window": WINDOW, "max_item_tokens": 16384, "worker_heartbeat_s": HEARTBEAT_S, **changes})


def check(result, images: list[np.ndarray], model) -> None:
    assert len(result.items) == len(images)
    for item, picture in zip(result.items, images):
        expected = model.encode_patches(*preprocess_image(picture))
        torch.testing.assert_close(item.embeddings, expected.embeddings, **TOLERANCE)


async def until(condition, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s:.1f} s waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def stopped(pid: int):
    """The process stopped (alive, running nothing) while the block runs, and never after it:
    SIGCONT is harmless to a process the engine killed meanwhile, or to one that reused its pid."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def mappings_of(name: str) -> int:
    """How many mappings of the memory file `name` this process holds."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sum(line.endswith(f" /memfd:{name} (deleted)") for line in lines)


def test_a_stopped_worker_is_not_ready_its_windows_end_in_time_and_it_is_restarted(model):
    async def run() -> None:
        async with Engine(config(scheduler=SchedulerConfig(policy="immediate"))) as engine:  # no window waits
            loop = asyncio.get_running_loop()
            stuck = engine.health().worker_pids[0]
            big = [image(BIG, 1)]
            running = asyncio.ensure_future(engine.run(engine.admit(big), None, 0))
            await until(lambda: engine.stats()["windows_in_flight"] > 0, 60, "a window in flight")
            with stopped(stuck):
                began = loop.time()
                in_time = asyncio.ensure_future(engine.encode([image(64, 2)], deadline_ms=DEADLINE_S * 1e3))
                await until(lambda: engine.stats()["windows_in_flight"] == 2, 1, "a second window, on the stopped worker")
                await until(lambda: not engine.health().ready, NOTICED_WITHIN_S, "health to say not ready")
                health = engine.health()
                assert health.workers_ready == 0 and "worker 0 is not responding" in health.detail
                assert engine.stats()["workers_ready"] == 0
                try:  # a result after the restart, or a coded error; never after the 60 s window timeout
                    (await asyncio.wait_for(in_time, DEADLINE_S + MARGIN_S - (loop.time() - began))).release()
                except EngineError as err:
                    assert err.code in ("deadline_exceeded", "worker_failed")
            key, refs = await asyncio.wait_for(running, 120)  # the big window, retried on the restarted worker
            assert {ref.epoch for ref in refs} == {1}
            torch.testing.assert_close(torch.from_numpy(np.array(engine.read(refs[0])[:, 0])),
                                       model.encode_patches(*preprocess_image(big[0])).embeddings, **TOLERANCE)
            engine.release(key)
            stats, health = engine.stats(), engine.health()
            assert stats["worker_restarts"] == 1 and stats["worker_hangs"] == 1 and stats["windows_retried"] == 2
            assert health.ready and health.detail == "" and stuck not in health.worker_pids
            with await engine.encode([image(80, 3)]) as later:
                check(later, [image(80, 3)], model)

    asyncio.run(run())


def test_an_idle_stopped_worker_is_restarted_and_its_old_slabs_are_unmapped(model):
    async def run() -> None:
        async with Engine(config()) as engine:
            key, (old_ref,) = await engine.run(engine.admit([image(64, 0)]), None, 0)
            engine.read(old_ref)  # the engine's reader maps the slab of epoch 0...
            engine.release(key)  # ...which goes with the restart: nothing holds a result from it
            old_slab = old_ref.slab
            gc.collect()
            stuck = engine.health().worker_pids[0]
            with stopped(stuck):
                await until(lambda: not engine.health().ready, NOTICED_WITHIN_S, "health to say not ready")
                await until(lambda: engine.stats()["worker_restarts"] == 1, 120, "the restart")
            assert stuck not in engine.health().worker_pids
            with await engine.encode([image(72, 4)]) as later:  # from a slab of epoch 1
                check(later, [image(72, 4)], model)
            assert engine.slab_descriptor(old_slab) is None and mappings_of(old_slab) == 0

    asyncio.run(run())


def test_a_slow_worker_is_no_fault(model):
    """A long window, and a stop shorter than the grace (a busy host), restart nothing."""
    heartbeat_s = 0.3  # the grace is shorter than the big window

    async def run() -> None:
        async with Engine(config(worker_heartbeat_s=heartbeat_s)) as engine:
            pid = engine.health().worker_pids[0]
            with await asyncio.wait_for(engine.encode([image(BIG, 5)]), 120) as result:
                check(result, [image(BIG, 5)], model)
            with stopped(pid):
                paused = asyncio.ensure_future(engine.encode([image(64, 7)]))
                await asyncio.sleep(heartbeat_s)  # a beat: the last one is two beats old at most, within the grace
            with await asyncio.wait_for(paused, 30) as result:
                check(result, [image(64, 7)], model)
            await asyncio.sleep((HUNG_AFTER_BEATS + 2) * heartbeat_s)
            stats, health = engine.stats(), engine.health()
            assert stats["worker_restarts"] == 0 and stats["worker_hangs"] == 0
            assert health.ready and health.worker_pids == [pid]

    asyncio.run(run())


def test_the_heartbeat_setting_is_checked_and_set_by_the_serve_flag():
    assert EngineConfig().worker_heartbeat_s == 1.0
    for wrong in (0, -1.0, float("nan"), "1", None):
        with pytest.raises(ValueError, match="worker_heartbeat_s must be a number of seconds > 0"):
            EngineConfig(worker_heartbeat_s=wrong)
    with pytest.raises(ValueError, match="worker_heartbeat_s must be at least 0.05 s"):
        EngineConfig(worker_heartbeat_s=0.001)  # beats that fast would only keep the worker and the engine busy
    assert build_parser().parse_args(["serve", "--worker-heartbeat-s", "0.25"]).worker_heartbeat_s == 0.25
