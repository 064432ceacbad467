"""Worker processes that start ahead of need, on the CPU: a standby process replaces a killed
worker (and another takes its place), a dead standby gives way to a fresh process, and a worker
started before the engine (as `vitserve serve` starts its GPU workers) is adopted, or replaced
when it was started for other settings."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace

import psutil
import pytest
from worker_helpers import check, config, image, until

from vitserve import Engine, EngineConfig
from vitserve.engine.liveness import Heartbeat
from vitserve.launch import EarlyWorkers, WorkerSpec, run_worker, spawn, worker_endpoint
from vitserve.models import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def _spawned_children() -> set[int]:
    """This process's worker processes (spawned by multiprocessing), alive."""
    return {child.pid for child in psutil.Process().children()
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            and any("spawn_main" in part for part in child.cmdline())}


async def _worker_and_standby(engine: Engine) -> tuple[int, int]:
    """The pids of the engine's worker and of its standby process, once that has started."""
    worker = engine.health().worker_pids[0]
    await until(lambda: len(_spawned_children()) == 2, what="the standby process")
    (standby,) = _spawned_children() - {worker}
    return worker, standby


def test_a_standby_process_replaces_a_killed_worker_and_another_takes_its_place(model):
    async def run() -> None:
        async with Engine(config(standby_workers=True)) as engine:
            worker, standby = await _worker_and_standby(engine)
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
            worker, standby = await _worker_and_standby(engine)
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
