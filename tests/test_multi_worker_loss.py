"""Several CPU workers in one engine, with real worker processes and the tiny model, when one of
them is lost or stops answering while the others serve.

A worker killed under load has its windows retried, every request succeeds, and the engine stays
ready on the other worker (whose process is untouched) while the killed one restarts; afterwards
both serve. A stopped worker that does not answer its readiness probe makes it 1 of 2 workers ready,
not 0: the engine stays ready and serves on the other, and both are ready once it resumes. Without
restarts (`worker_restarts=0`), a killed worker leaves the engine serving on the others for good.
Dispatch and results with every worker up are tested in test_multi_worker.py; the helpers both files
use are in multi_worker_fixtures.py.

Nothing here asserts how long anything takes: waits are bounded (generously, for a loaded 2-core
machine) only so that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from multi_worker_fixtures import WAIT_S, burst, check, config, encode_all, image, scrape, served_by

from vitserve import Engine
from vitserve.models import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


async def until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"waited {timeout_s:g} s for {what}"
        await asyncio.sleep(0.01)


async def health_when(engine: Engine, condition, what: str):
    """The engine's health once `condition(health)` holds, that very snapshot (asserting on a later one
    could see a state that came after)."""
    seen = []

    def check() -> bool:
        seen[:] = [engine.health()]
        return condition(seen[0])

    await until(check, what)
    return seen[0]


def in_flight(engine: Engine, worker: int) -> int:
    """Windows the scheduler has sent `worker` that it has not answered."""
    return len(engine.scheduler.workers[worker].in_flight)


# -- 1. a killed worker while the other serves -----------------------------------------------------


def test_a_worker_killed_under_load_is_restarted_while_the_other_serves(model):
    """The victim is stopped (SIGSTOP) before the load and killed once it holds windows: windows sent
    to a stopped process cannot have been answered, so its loss certainly costs windows, which must
    be retried. (Heartbeats are slowed so that the stop alone is not taken for a hang.)"""
    survivor, victim = 0, 1
    load = burst(24, seed=100)
    during = [image(128, 200)]
    after = burst(12, seed=300)

    async def run() -> None:
        async with Engine(config(worker_heartbeat_s=30.0)) as engine:
            survivor_pid, victim_pid = engine.health().worker_pids  # (in worker order while all run)
            os.kill(victim_pid, signal.SIGSTOP)
            try:
                running = [asyncio.ensure_future(engine.encode(items)) for items in load]
                await until(lambda: in_flight(engine, victim) > 0, "a window sent to the stopped worker")
            finally:
                os.kill(victim_pid, signal.SIGKILL)  # (also ends it if the wait failed)
            # The engine sees the loss: the victim restarts, the survivor serves, the engine is ready.
            health = await health_when(engine, lambda h: h.workers_ready == 1, "the loss to be noticed")
            assert health.ready and (health.workers_ready, health.workers) == (1, 2), health
            assert "no worker is up" not in health.detail
            assert health.worker_pids[0] == survivor_pid and victim_pid not in health.worker_pids
            # A request sent now, ahead of the load (lower priority numbers go first), succeeds. If the
            # victim is not back yet (no restart counted) only the survivor can have served it: in
            # practice it is not, as a restart starts a process and loads the model.
            with await asyncio.wait_for(engine.encode(during, priority=-1), WAIT_S) as result:
                check(result, during, model)
                if engine.stats()["worker_restarts"] == 0:
                    assert served_by(result.refs[0]) == (survivor, 0)
            results = await asyncio.wait_for(asyncio.gather(*running), WAIT_S)
            try:
                for result, items in zip(results, load):
                    check(result, items, model)
                    # nothing came from the victim's first epoch: it ran nothing before it died
                    assert all(served_by(ref) != (victim, 0) for ref in result.refs)
            finally:
                for result in results:
                    result.release()
            stats = engine.stats()
            assert stats["windows_retried"] >= 1 and stats["worker_hangs"] == 0
            await until(lambda: engine.stats()["worker_restarts"] == 1, "the restart")
            health = await health_when(engine, lambda h: h.workers_ready == 2, "both workers ready")
            assert health.ready and health.detail == ""
            assert health.worker_pids[0] == survivor_pid, "the survivor's process is untouched"
            assert health.worker_pids[1] not in (survivor_pid, victim_pid)
            # Both serve again: the restarted worker writes slabs of its new epoch.
            results = await encode_all(engine, after)
            try:
                for result, items in zip(results, after):
                    check(result, items, model)
                assert {served_by(ref) for result in results for ref in result.refs} == {(survivor, 0), (victim, 1)}
            finally:
                for result in results:
                    result.release()
            assert engine.stats()["worker_restarts"] == 1
            # Nothing is left held (a release reaches the engine a loop turn later).
            await until(lambda: engine.stats()["requests_open"] == engine.stats()["slots_leased"] == 0, "the releases")

    asyncio.run(run())


# -- 2. readiness with two workers -------------------------------------------------------------


def test_a_stopped_worker_is_unready_and_gets_no_windows_while_the_other_serves(model):
    """Heartbeats too slow to notice the stop and no window watchdog: the stopped worker is neither
    hung nor stuck, only unproven (engine/probes.py). The engine stays ready on the other worker, and
    once the stopped one is suspect the scheduler sends it nothing while the other can take windows;
    resumed, it is ready again with nothing restarted."""
    survivor, victim = 1, 0
    settings = dict(worker_heartbeat_s=30.0, readiness_probe_s=0.2, readiness_timeout_s=1.0, window_timeout_s=None)

    async def run() -> None:
        async with Engine(config(**settings)) as engine:
            await until(lambda: engine.stats()["probes_sent"] >= 2, "the first probes")
            pids = engine.health().worker_pids
            os.kill(pids[victim], signal.SIGSTOP)
            try:
                # (the very snapshot that names the stopped worker: an idle survivor answers its probes)
                health = await health_when(engine, lambda h: f"worker {victim} has not answered its readiness "
                                           "probe" in h.detail, "the stopped worker to be unready")
                assert health.ready and (health.workers_ready, health.workers) == (1, 2), health
                assert f"worker {victim} has not answered its readiness probe" in health.detail
                assert f"worker {survivor}" not in health.detail
                assert engine.stats()["workers_unproven"] == 1 and engine.stats()["workers_ready"] == 1  # (as health counts)
                status, text = await scrape(engine, "/readyz")
                assert (status, text) == (200, "ready: 1 of 2 workers up\n")
                await until(lambda: engine.scheduler.workers[victim].suspect, "the scheduler to know it suspect")
                items = burst(8, seed=400)
                results = await asyncio.wait_for(encode_all(engine, items), WAIT_S)  # none waits on the victim
                for result, item in zip(results, items):
                    with result:
                        check(result, item, model)
                        assert served_by(result.refs[0])[0] == survivor
                assert in_flight(engine, victim) == 0 and engine.health().ready
            finally:
                os.kill(pids[victim], signal.SIGCONT)
            health = await health_when(engine, lambda h: h.workers_ready == 2, "both workers ready again")
            assert health.ready and health.detail == "" and health.worker_pids == pids
            assert not engine.scheduler.workers[victim].suspect
            assert engine.stats()["worker_restarts"] == 0 and engine.stats()["worker_hangs"] == 0
            results = await encode_all(engine, burst(8, seed=500))
            for result in results:
                result.release()

    asyncio.run(run())


# -- 3. without restarts -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_without_restarts_a_killed_worker_leaves_the_engine_serving_on_the_others(model, workers):
    """Killed while it runs windows of a burst: they are retried on the other workers (a retry
    needs no restart), and the engine goes on with one worker fewer for good."""
    victim, survivors = workers - 1, list(range(workers - 1))
    load = burst(24, seed=600)

    async def run() -> None:
        async with Engine(config(workers, worker_restarts=0)) as engine:
            pids = engine.health().worker_pids  # (in worker order while all run)
            running = [asyncio.ensure_future(engine.encode(items)) for items in load]
            try:
                await until(lambda: in_flight(engine, victim) > 0, "a window on the victim")
            finally:
                os.kill(pids[victim], signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*running), WAIT_S)
            try:
                for result, items in zip(results, load):
                    check(result, items, model)
            finally:
                for result in results:
                    result.release()
            health = await health_when(engine, lambda h: h.workers_ready == workers - 1, "the loss to be noticed")
            assert health.ready and health.workers == workers, health
            assert "no worker is up" not in health.detail
            assert health.worker_pids == pids[:victim]
            assert health.pids_by_worker == {w: pids[w] for w in range(workers) if w != victim}
            assert f"worker {victim} is down" in health.detail  # (named while the others serve)
            status, text = await scrape(engine, "/readyz")
            assert (status, text) == (200, f"ready: {workers - 1} of {workers} workers up\n")
            # Later requests, many at once (4 full windows), go to every survivor; nothing restarts.
            later = burst(8, seed=700)
            results = await encode_all(engine, later)
            try:
                for result, items in zip(results, later):
                    check(result, items, model)
                assert {served_by(ref) for result in results for ref in result.refs} == {(w, 0) for w in survivors}
            finally:
                for result in results:
                    result.release()
            stats = engine.stats()
            assert stats["worker_restarts"] == 0 and stats["workers_ready"] == workers - 1
            # (a release reaches the engine a loop turn later)
            await until(lambda: engine.stats()["requests_open"] == 0, "the releases")

    asyncio.run(run())
