"""Readiness probes (engine/probes.py): an idle worker proves with a small forward that it still
serves. A worker that cannot run one (here: stopped, with heartbeats too slow to notice) is unready
with the reason until it answers, probes never pile up while it does not, and past the window
watchdog it is killed and restarted like a worker with a stuck window."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from vitserve import Engine, EngineConfig
from vitserve.workers import WindowConfig


def config(**overrides) -> EngineConfig:
    settings = dict(window=WindowConfig(min_budget=64, max_budget=512), max_item_tokens=4096,
                    worker_heartbeat_s=30.0, readiness_probe_s=0.2, readiness_timeout_s=1.0, window_timeout_s=None)
    return EngineConfig(**(settings | overrides))


async def until(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        await asyncio.sleep(0.05)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_an_idle_worker_is_probed_and_stays_ready():
    async def run() -> None:
        async with Engine(config()) as engine:
            await until(lambda: engine.stats()["probes_sent"] >= 3, "three probes")
            health = engine.health()
            assert health.ready and health.workers_ready == 1 and health.detail == ""
            assert engine.stats()["workers_unproven"] == 0
            (await engine.encode([image(0)])).release()  # windows go on among the probes

    asyncio.run(run())


def test_a_worker_that_runs_nothing_is_unready_until_it_answers_and_probes_do_not_pile_up():
    async def run() -> None:
        async with Engine(config()) as engine:
            await until(lambda: engine.stats()["probes_sent"] >= 1, "a first probe")
            pid = engine.health().worker_pids[0]
            os.kill(pid, signal.SIGSTOP)  # alive, beating too slowly to be found hung, running nothing
            try:
                await until(lambda: not engine.health().ready, "readiness to go")
                sent = engine.stats()["probes_sent"]
                health = engine.health()
                assert health.workers_ready == 0 and "has not answered its readiness probe" in health.detail
                assert engine.stats()["workers_unproven"] == 1 and engine.stats()["workers_ready"] == 0
                await asyncio.sleep(1.5)  # over seven probe periods: still the one probe out
                assert engine.stats()["probes_sent"] == sent
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(lambda: engine.health().ready, "readiness to come back")
            assert engine.health().worker_pids == [pid] and engine.stats()["worker_restarts"] == 0
            (await engine.encode([image(1)])).release()

    asyncio.run(run())


def test_a_worker_stopped_in_the_middle_of_a_window_is_unready_until_it_answers():
    """No probe goes to a worker with windows out: the window itself, unanswered long past its predicted
    end, takes readiness away (long before the window watchdog, off here)."""
    async def run() -> None:
        async with Engine(config(readiness_probe_s=60.0)) as engine:  # no probe within the test
            (await engine.encode([image(3)])).release()
            pid = engine.health().worker_pids[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                encoding = asyncio.ensure_future(engine.encode([image(4)]))
                await until(lambda: not engine.health().ready, "readiness to go", timeout_s=20.0)
                health = engine.health()
                assert "past its predicted end" in health.detail and health.workers_ready == 0
                assert engine.stats()["probes_sent"] == 0 and not encoding.done()
            finally:
                os.kill(pid, signal.SIGCONT)
            (await encoding).release()
            await until(lambda: engine.health().ready, "readiness to come back")
            assert engine.stats()["worker_restarts"] == 0

    asyncio.run(run())


def test_a_probe_unanswered_past_the_window_watchdog_means_a_stuck_worker():
    async def run() -> None:
        async with Engine(config(window_timeout_s=2.0)) as engine:
            await until(lambda: engine.stats()["probes_sent"] >= 1, "a first probe")
            stuck = engine.health().worker_pids[0]
            os.kill(stuck, signal.SIGSTOP)
            try:
                await until(lambda: engine.stats()["worker_restarts"] == 1, "the stuck worker's restart")
            finally:
                try:
                    os.kill(stuck, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await until(lambda: engine.health().ready, "readiness after the restart")
            assert stuck not in engine.health().worker_pids
            (await engine.encode([image(2)])).release()

    asyncio.run(run())


def test_without_probes_a_late_window_leaves_readiness_alone():
    """readiness_probe_s=None: a worker is ready while its process beats, however late its window."""
    async def run() -> None:
        async with Engine(config(readiness_probe_s=None)) as engine:
            (await engine.encode([image(5)])).release()
            pid = engine.health().worker_pids[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                encoding = asyncio.ensure_future(engine.encode([image(6)]))
                await until(lambda: engine.stats()["windows_in_flight"] == 1, "the window to go out")
                await asyncio.sleep(2.5)  # over twice readiness_timeout_s past any prediction
                assert engine.health().ready and engine.stats()["workers_unproven"] == 0
            finally:
                os.kill(pid, signal.SIGCONT)
            (await encoding).release()

    asyncio.run(run())


def test_without_probes_none_are_sent():
    async def run() -> None:
        async with Engine(config(readiness_probe_s=None)) as engine:
            await asyncio.sleep(1.0)
            assert engine.stats()["probes_sent"] == 0 and engine.health().ready

    asyncio.run(run())


@pytest.mark.parametrize("field, value", [("readiness_probe_s", 0), ("readiness_timeout_s", None),
                                          ("readiness_probe_s", "5"), ("readiness_probe_s", 0.01)])
def test_probe_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
