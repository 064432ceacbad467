"""Worker failure on the CPU, with real worker processes: a worker killed mid-window or stuck
past the watchdog is restarted in a new epoch, its windows are retried once, results delivered
before stay readable, stale references fail, and health says not-ready while no worker serves."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace

import numpy as np
import psutil
import pytest
import torch
from slab_helpers import slab_files

from vitserve import Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.engine.liveness import Heartbeat
from vitserve.ipc.messages import OutputRef
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabError
from vitserve.launch import EarlyWorkers, WorkerSpec, run_worker, spawn, worker_endpoint
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image
from vitserve.workers import WindowConfig

WINDOW = WindowConfig(min_budget=64, max_budget=512)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
BIG = 1536  # a 96×96-patch image: one eager window of about a second on the CPU, long enough to kill it in


def image(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def check(result, images: list[np.ndarray], model) -> None:
    assert len(result.items) == len(images)
    for item, picture in zip(result.items, images):
        expected = model.encode_patches(*preprocess_image(picture))
        torch.testing.assert_close(item.embeddings, expected.embeddings, **TOLERANCE)


def check_refs(engine: Engine, refs: list[OutputRef], images: list[np.ndarray], model) -> None:
    """Output references read through the engine: rows are (embedding, deepstack...)."""
    for ref, picture in zip(refs, images, strict=True):
        expected = model.encode_patches(*preprocess_image(picture))
        torch.testing.assert_close(torch.from_numpy(np.array(engine.read(ref)[:, 0])), expected.embeddings, **TOLERANCE)


async def until(condition, timeout_s: float = 120.0, what: str = "the condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def config(**changes) -> EngineConfig:
    return EngineConfig(window=WINDOW, max_item_tokens=16384, **changes)


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


def _spawned_children() -> set[int]:
    """This process's worker processes (spawned by multiprocessing), alive."""
    return {child.pid for child in psutil.Process().children()
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            and any("spawn_main" in part for part in child.cmdline())}


def test_a_standby_process_replaces_a_killed_worker_and_another_takes_its_place(model):
    async def run() -> None:
        async with Engine(config(standby_workers=True)) as engine:
            worker = engine.health().worker_pids[0]
            await until(lambda: len(_spawned_children()) == 2, what="the standby process")
            (standby,) = _spawned_children() - {worker}
            os.kill(worker, signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, what="the restart")
            assert engine.health().worker_pids == [standby]  # the standby took over
            await until(lambda: len(_spawned_children()) == 2, what="a new standby process")
            assert worker not in _spawned_children()
            pictures = [image(64, 0), image(96, 1)]
            with await engine.encode(pictures) as result:
                check(result, pictures, model)
        assert _spawned_children() == set()  # closing stops the standby too

    asyncio.run(run())


def test_a_dead_standby_is_replaced_by_a_fresh_process_at_the_restart(model):
    async def run() -> None:
        async with Engine(config(standby_workers=True)) as engine:
            worker = engine.health().worker_pids[0]
            await until(lambda: len(_spawned_children()) == 2, what="the standby process")
            (standby,) = _spawned_children() - {worker}
            os.kill(standby, signal.SIGKILL)
            # Noticed while it loads (no longer counted), or found gone at the restart:
            await until(lambda: engine.stats()["standby_loading"] == 0, what="the dead standby not counted")
            os.kill(worker, signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, what="the restart")
            (now,) = engine.health().worker_pids
            assert now not in (worker, standby)
            with await engine.encode([image(64, 2)]) as result:
                check(result, [image(64, 2)], model)

    asyncio.run(run())


def test_the_standby_setting_defaults_to_gpus_only():
    assert not EngineConfig(devices=("cpu",)).standby("cpu")
    assert EngineConfig(devices=("cuda:0",)).standby("cuda:0")
    assert EngineConfig(devices=("cpu",), standby_workers=True).standby("cpu")
    assert not EngineConfig(devices=("cuda:0",), standby_workers=False).standby("cuda:0")


def _early_worker(engine_config: EngineConfig, socket_dir: str, **changes) -> EarlyWorkers:
    """A worker process started before the engine, as `vitserve serve` starts its GPU workers."""
    heartbeat = Heartbeat(engine_config.worker_heartbeat_s)
    spec = WorkerSpec(worker=0, endpoint=worker_endpoint(socket_dir, 0, 0), model=engine_config.model, device="cpu",
                      dtype=None, threads=engine_config.worker_threads("cpu"), log_level=logging.getLogger().level,
                      heartbeat_s=engine_config.worker_heartbeat_s, beat_at=heartbeat.beat_at)
    spec, process = spawn(replace(spec, **changes), run_worker)
    return EarlyWorkers(socket_dir, {0: (spec, process, heartbeat)})


def test_a_worker_started_before_the_engine_is_adopted(model, tmp_path):
    async def run() -> None:
        engine_config = config()
        early = _early_worker(engine_config, str(tmp_path))
        pid = early.started[0][1].pid
        async with Engine(engine_config, early) as engine:
            assert engine.health().worker_pids == [pid]
            pictures = [image(64, 0), image(96, 1)]
            with await engine.encode(pictures) as result:
                check(result, pictures, model)

    asyncio.run(run())


def test_a_worker_started_for_other_settings_is_stopped_and_replaced(model, tmp_path):
    async def run() -> None:
        engine_config = config()
        early = _early_worker(engine_config, str(tmp_path), model="random:qwen3-vl-2b")
        process = early.started[0][1]
        async with Engine(engine_config, early) as engine:
            assert engine.health().worker_pids != [process.pid]
            process.join(10)
            assert not process.is_alive()
            with await engine.encode([image(64, 2)]) as result:
                check(result, [image(64, 2)], model)

    asyncio.run(run())
