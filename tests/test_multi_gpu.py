"""Several GPU workers (`gpu`): on every visible GPU, or two workers on one where there is only one
(the multi-worker paths on the device: slabs, dispatch, retries). A burst reaches every worker and
gives the one-worker engine's results; a worker killed under load costs no request while the
others serve; the rest keep serving without restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import torch

from vitserve import Engine, EngineConfig
from vitserve.workers import WindowConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:qwen3-vl-2b"
WAIT_S = 300


def devices() -> tuple[str, ...]:
    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count)) if count > 1 else ("cuda:0", "cuda:0")


def config(devices: tuple[str, ...], **overrides) -> EngineConfig:
    # float32: the engines' results compare closely whatever windows their items were packed into
    return EngineConfig(model=MODEL, devices=devices, dtype="float32",
                        window=WindowConfig(min_budget=256, max_budget=4096), **overrides)


def requests(count: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    shapes = ((448, 448, 3), (336, 500, 3), (4, 224, 224, 3), (224, 224, 3))
    return [[rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8)] for i in range(count)]


async def encode_all(engine: Engine, batch: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """Every request in flight at once; each result copied and released as it comes."""
    async def one(items: list[np.ndarray]) -> torch.Tensor:
        with await engine.encode(items) as result:
            return result.items[0].embeddings.clone()

    return await asyncio.wait_for(asyncio.gather(*(one(items) for items in batch)), WAIT_S)


def test_a_burst_reaches_every_worker_and_gives_one_workers_results():
    batch = requests(48)

    async def run(on: tuple[str, ...]) -> tuple[list[torch.Tensor], dict[int, int]]:
        async with Engine(config(on)) as engine:
            outputs = await encode_all(engine, batch)
            return outputs, engine.run_counts.snapshot().worker_windows

    one, _ = asyncio.run(run(("cuda:0",)))
    many, windows = asyncio.run(run(devices()))
    assert sorted(windows) == list(range(len(devices()))) and all(count > 0 for count in windows.values()), windows
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_worker_killed_under_load_costs_no_request_and_the_others_serve_on():
    batch = requests(64)

    async def run() -> None:
        async with Engine(config(devices())) as engine:
            victim = engine.health().worker_pids[-1]
            load = asyncio.ensure_future(encode_all(engine, batch))
            while engine.stats()["windows_in_flight"] == 0:
                await asyncio.sleep(0.001)
            os.kill(victim, signal.SIGKILL)
            assert len(await load) == len(batch)  # every request answered: the lost windows ran again
            while engine.stats()["worker_restarts"] < 1:
                await asyncio.sleep(0.05)
            assert victim not in engine.health().worker_pids
            assert len(await encode_all(engine, batch[:8])) == 8

    asyncio.run(run())


def test_without_restarts_the_other_workers_serve_on():
    async def run() -> None:
        async with Engine(config(devices(), worker_restarts=0)) as engine:
            os.kill(engine.health().worker_pids[-1], signal.SIGKILL)
            while engine.health().workers_ready == len(devices()):
                await asyncio.sleep(0.05)
            assert len(await encode_all(engine, requests(16))) == 16
            health = engine.health()
            assert health.ready and health.workers_ready == len(devices()) - 1

    asyncio.run(run())
