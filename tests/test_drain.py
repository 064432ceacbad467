"""Draining and crashes of the engine: SIGTERM or close() lets admitted requests finish and answers
new ones with `shutting_down`; a crashed engine's slabs are removed by the next start and its
workers exit by themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
from served import served
from slab_helpers import socket_files_left

from vitserve import AsyncClient, Client, Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.workers import WindowConfig

WINDOW = WindowConfig(min_budget=64, max_budget=512)
BIG = 1536  # one eager window of about a second on the CPU
FLAGS = ("--min-budget", "64", "--max-budget", "512", "--max-item-tokens", "16384")


def image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_close_lets_admitted_requests_finish_and_refuses_new_ones():
    async def run() -> None:
        engine = Engine(EngineConfig(window=WINDOW, max_item_tokens=16384))
        await engine.start()
        running = [asyncio.ensure_future(engine.run(engine.admit([image(BIG, 1)]), None, 0))]
        running += [asyncio.ensure_future(engine.run(engine.admit([image(64 + 8 * i, i)]), None, 0)) for i in range(6)]
        await asyncio.sleep(0)  # all admitted
        closing = asyncio.ensure_future(engine.close())
        await asyncio.sleep(0.05)
        with pytest.raises(EngineError) as info:
            engine.submit(engine.admit([image(64)]), None, 0)
        assert info.value.code == "shutting_down"
        health = engine.health()
        assert not health.ready and health.detail == "shutting down"
        for done in await asyncio.gather(*running):  # every one got its result, none an error
            key, refs = done
            assert len(refs) == 1 and refs[0].epoch == 0
        await closing

    asyncio.run(run())


def test_what_does_not_finish_within_the_drain_timeout_fails_with_shutting_down():
    async def run() -> None:
        # output_windows=64: three big images need more output rows than the default gives one worker
        async with Engine(EngineConfig(window=WINDOW, max_item_tokens=16384, drain_timeout_s=0.2,
                                       output_windows=64)) as engine:
            running = asyncio.ensure_future(engine.encode([image(BIG, 1)] * 3))
            await asyncio.sleep(0.05)
            assert await engine.drain() == 1
            with pytest.raises(EngineError) as info:
                await running
            assert info.value.code == "shutting_down" and "drain_timeout_s=0.2" in info.value.message
            assert engine.stats()["requests_open"] == 0

    asyncio.run(run())


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(tmp_path):
    endpoint = f"ipc://{tmp_path}/drain.sock"

    async def run(process: subprocess.Popen) -> None:
        async with AsyncClient(endpoint) as client:
            pictures = [image(BIG, 1), *(image(64 + 8 * i, i) for i in range(8))]
            running = [asyncio.ensure_future(client.encode([picture])) for picture in pictures]
            await asyncio.sleep(0)  # the encodes go out
            assert (await client.stats())["requests"] == len(pictures)  # answered after they were admitted
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            health = await client.health()
            assert not health.ready and health.detail == "shutting down"
            with pytest.raises(EngineError) as info:
                await client.encode([image(64)])
            assert info.value.code == "shutting_down"
            for result in await asyncio.gather(*running):
                assert result.items[0].embeddings.shape[1] > 0
                result.release()

    with served(endpoint, *FLAGS) as process:
        asyncio.run(run(process))
    assert socket_files_left(endpoint) == []


def test_a_crashed_engine_leaves_no_slabs_its_workers_exit_and_the_next_one_takes_its_endpoint(tmp_path):
    endpoint = f"ipc://{tmp_path}/first.sock"
    with served(endpoint, *FLAGS) as process:
        with Client(endpoint) as client:
            held = client.encode([image(64)])  # held, and mapped here: the crash leaves it behind
            workers = client.health().worker_pids
            process.kill()
            process.wait(30)
            assert held.items[0].embeddings.isfinite().all()  # a mapping outlives its engine...
            held.release()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("vitserve-")]  # ...nothing else does
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        assert time.monotonic() < deadline, "the workers of a killed engine did not exit"
        time.sleep(0.1)
    assert socket_files_left(endpoint)  # a killed engine cannot remove its sockets: the next one replaces them
    with served(endpoint, *FLAGS):
        with Client(endpoint) as client:
            with client.encode([image(64)]) as result:
                assert result.items[0].embeddings.isfinite().all()
