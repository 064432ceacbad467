"""Worker failure on the CPU, with real worker processes: a worker killed mid-window or stuck
past the watchdog is restarted in a new epoch, its windows are retried once, results delivered
before stay readable, stale references fail, and health says not-ready while no worker serves."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch
from slab_helpers import slab_files
from worker_helpers import check, check_refs, config, image, until

from vitserve import Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.ipc.messages import OutputRef
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabError
from vitserve.models import load_model

BIG = 1536  # a 96×96-patch image: one eager window of about a second on the CPU, long enough to kill it in


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def test_a_worker_killed_mid_window_is_restarted_and_its_requests_retried(model):
    async def run() -> None:
        async with Engine(config()) as engine:
            kept, (old_ref,) = await engine.run(engine.admit([image(64, 0)]), None, 0)  # epoch 0, kept across the restart
            first_pid = engine.health().worker_pids[0]
            pictures = [image(BIG, 1), image(96, 2), image(48, 3)]
            running = asyncio.ensure_future(engine.run(engine.admit(pictures), None, 0))
            await until(lambda: engine.stats()["windows_in_flight"] > 0, what="a window in flight")
            os.kill(first_pid, signal.SIGKILL)
            await until(lambda: not engine.health().ready, what="health to say not ready")
            health = engine.health()
            assert health.workers_ready == 0 and "restarting" in health.detail
            key, refs = await asyncio.wait_for(running, 120)  # retried on the restarted worker
            check_refs(engine, refs, pictures, model)
            assert {ref.epoch for ref in refs} == {1}
            engine.release(key)
            health = engine.health()
            assert health.ready and health.worker_pids[0] != first_pid
            stats = engine.stats()
            assert stats["worker_restarts"] == 1 and stats["windows_retried"] >= 1
            # The result delivered before the crash still reads its own rows, from the retired epoch.
            check_refs(engine, [old_ref], [image(64, 0)], model)
            assert engine.slab_descriptor(old_ref.slab) is not None
            engine.release(kept)
            await until(lambda: engine.slab_descriptor(old_ref.slab) is None, 5, "the retired slab to go")
            with await engine.encode([image(80, 4)]) as later:  # and later requests succeed
                check(later, [image(80, 4)], model)
            await asyncio.sleep(0.05)
            assert engine.stats()["slots_leased"] == 0 and engine.stats()["requests_open"] == 0

    asyncio.run(run())


def test_references_of_an_old_epoch_fail_instead_of_reading_new_data():
    async def run() -> tuple[OutputRef, OutputRef]:
        async with Engine(config()) as engine:
            key, (old_ref,) = await engine.run(engine.admit([image(64, 0)]), None, 0)
            engine.release(key)
            os.kill(engine.health().worker_pids[0], signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, what="the restart")
            key, (new_ref,) = await engine.run(engine.admit([image(64, 0)]), None, 0)
            reader = SlabReader(engine._open_slab)
            with pytest.raises(SlabError, match="stale reference"):  # the new slab named with the old epoch
                reader.array(new_ref.slab, old_ref.epoch, new_ref.offset, new_ref.shape, new_ref.dtype)
            with pytest.raises(SlabError, match="is not one of this engine's"):  # the old slab, gone with its last lease
                reader.array(old_ref.slab, old_ref.epoch, old_ref.offset, old_ref.shape, old_ref.dtype)
            reader.close()
            engine.release(key)
            return old_ref, new_ref

    old_ref, new_ref = asyncio.run(run())
    assert (old_ref.epoch, new_ref.epoch) == (0, 1) and old_ref.slab != new_ref.slab


def test_an_item_lost_twice_fails_with_worker_failed(model):
    async def run() -> None:
        async with Engine(config()) as engine:
            running = asyncio.ensure_future(engine.encode([image(BIG, 1)]))
            for attempt in range(2):
                pids = engine.health().worker_pids
                await until(lambda: engine.stats()["windows_in_flight"] > 0, what="a window in flight")
                os.kill(pids[0], signal.SIGKILL)
                if attempt == 0:
                    await until(lambda: engine.stats()["worker_restarts"] == 1, what="the first restart")
            with pytest.raises(EngineError) as info:
                await asyncio.wait_for(running, 120)
            assert info.value.code == "worker_failed" and "twice" in info.value.message
            await until(lambda: engine.stats()["worker_restarts"] == 2, what="the second restart")
            with await engine.encode([image(64, 5)]) as later:
                check(later, [image(64, 5)], model)

    asyncio.run(run())


def test_a_stuck_worker_is_killed_by_the_watchdog_and_the_window_retried(model):
    async def run() -> None:
        async with Engine(config(window_timeout_s=1.0)) as engine:
            stuck = engine.health().worker_pids[0]
            os.kill(stuck, signal.SIGSTOP)  # alive, but runs nothing
            try:
                pictures = [image(64, 6), image(72, 7)]
                with await asyncio.wait_for(engine.encode(pictures), 120) as result:
                    check(result, pictures, model)
            finally:
                try:
                    os.kill(stuck, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert engine.stats()["worker_restarts"] == 1
            assert stuck not in engine.health().worker_pids

    asyncio.run(run())


def test_without_restarts_a_dead_worker_fails_requests_instead_of_hanging():
    async def run() -> None:
        async with Engine(config(worker_restarts=0)) as engine:
            (await engine.encode([image(64, 0)])).release()
            os.kill(engine.health().worker_pids[0], signal.SIGKILL)
            in_flight = asyncio.ensure_future(engine.encode([image(96, 1)] * 8))
            with pytest.raises(EngineError) as info:
                await asyncio.wait_for(in_flight, 30)
            assert info.value.code == "worker_failed"
            with pytest.raises(EngineError) as info:
                await engine.encode([image(64, 0)])
            assert info.value.code == "worker_failed" and "no worker is running" in info.value.message
            health = engine.health()
            assert not health.ready and health.workers_ready == 0 and health.detail == "no worker is up"
            assert engine.stats()["requests_open"] == 0.0

    asyncio.run(run())


def test_restart_settings_are_checked():
    with pytest.raises(ValueError, match="worker_restarts"):
        EngineConfig(worker_restarts=-1)
    with pytest.raises(ValueError, match="window_timeout_s"):
        EngineConfig(window_timeout_s=0)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        EngineConfig(drain_timeout_s=-1)


def test_slab_files_of_an_engine_are_gone_after_close():
    async def run() -> int:
        async with Engine(config()) as engine:
            os.kill(engine.health().worker_pids[0], signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, what="the restart")
            (await engine.encode([image(64, 0)])).release()
        return os.getpid()

    pid = asyncio.run(run())
    assert slab_files(pid) == []


def test_a_restarted_worker_reuses_its_measured_cost_model(model):
    """Measuring the cost model took most of a CPU worker's start; a restart on the same device with
    the same config keeps the model it measured (bit-equal) and serves the same embeddings."""
    async def run() -> None:
        async with Engine(config()) as engine:
            measured = engine._handles[0].ready.cost
            with await engine.encode([image(64, 0)]) as before:
                expected = before.items[0].embeddings.clone()
            os.kill(engine.health().worker_pids[0], signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, what="the restart")
            assert engine._handles[0].ready.cost == measured
            with await engine.encode([image(64, 0)]) as after:
                torch.testing.assert_close(after.items[0].embeddings, expected, rtol=0, atol=0)

    asyncio.run(run())


def test_a_worker_exits_at_once_when_its_engine_is_killed(tmp_path):
    """The end of the engine's link is the worker's signal to go: no orphan keeps its device."""
    import psutil
    from served import served

    from vitserve import Client

    endpoint = f"ipc://{tmp_path}/engine"
    with served(endpoint, "--min-budget", "64", "--max-budget", "256") as process:
        with Client(endpoint) as client:
            worker = psutil.Process(client.health().worker_pids[0])
        process.kill()  # SIGKILL: the engine cannot say Shutdown
        process.wait(10)
        worker.wait(10)  # (psutil.TimeoutExpired if it lingers)
        assert "the engine closed its end of the link: exiting" in process.stderr.read()
