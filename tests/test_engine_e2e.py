"""The engine end to end on the CPU: `vitserve serve` as a real process with a real worker
process, clients over real ipc:// and tcp:// sockets, and the embedded Engine.

Results must equal the model's eager `encode_patches` on the same inputs; every request of
many concurrent clients is answered exactly once; nothing stays leased and no shared-memory
file remains after shutdown.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from served import local_endpoint, served
from slab_helpers import slab_files, socket_files_left

from vitserve import Engine, EngineConfig
from vitserve import AsyncClient, Client
from vitserve.engine import EngineError
from vitserve.models import load_model
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video
from vitserve.preprocess.geometry import largest_item_tokens
from vitserve.workers import WindowConfig
from vitserve.workers.capacities import derive_budgets

WINDOW = WindowConfig(min_budget=64, max_budget=2048)
BUDGETS = derive_budgets(WINDOW.min_budget, WINDOW.max_budget, 4)  # (merge² = 4)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # float32; windows pack items differently than one eager call


def inputs() -> list:
    """Images of several sizes and aspect ratios, a video, and a preprocessed item."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (96, 48, 3), (40, 120, 3))]
    video = rng.integers(0, 256, (4, 64, 80, 3), dtype=np.uint8)
    patches = preprocess_image(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    return [*images, video, (patches.pixel_values, patches.grid_thw)]


@pytest.fixture(scope="module")
def expected() -> list:
    """Each input's (eager output, kind, the processor's grid (t, h, w))."""
    model = load_model("random:tiny")
    outputs = []
    for item in inputs():
        if isinstance(item, tuple):
            (pixel_values, grid), kind = item, "patches"
        else:
            kind = "video" if item.ndim == 4 else "image"
            pixel_values, grid = preprocess_video(item) if kind == "video" else preprocess_image(item)
        outputs.append((model.encode_patches(pixel_values, grid), kind, tuple(int(x) for x in grid.reshape(-1))))
    return outputs


def check_model(model, budgets: tuple[int, ...]) -> None:
    """The served model as a client or an embedded engine sees it: what it is (type, the fingerprint
    of the very weights loaded), its outputs and the settings a caller builds prompts with."""
    assert (model.source, model.model_type, model.dtype) == ("random:tiny", "qwen3_vl", "float32")
    assert model.fingerprint == load_model("random:tiny").weights_fingerprint and len(model.fingerprint) == 32
    assert (model.out_hidden, model.num_deepstack, model.budgets) == (128, 2, budgets)
    assert model.item_token_limit == max(2 * budgets[-1], largest_item_tokens(PreprocessConfig()))  # the default
    assert PreprocessConfig(**model.preprocess) == PreprocessConfig()  # (rebuilt from its fields)


def check(result, indices: list[int], expected: list) -> None:
    """The same rows as the model's eager path, and each item's kind and grid: what a decoder needs
    to lay out its placeholders (rows = t * h * w / merge²)."""
    assert len(result.items) == len(indices)
    for item, index in zip(result.items, indices):
        output, kind, grid = expected[index]
        torch.testing.assert_close(item.embeddings, output.embeddings, **TOLERANCE)
        torch.testing.assert_close(item.deepstack, output.deepstack, **TOLERANCE)
        assert (item.kind, item.grid) == (kind, grid)
        assert item.embeddings.shape[0] == grid[0] * grid[1] * grid[2] // 4


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def server(request, tmp_path_factory):
    """`vitserve serve` in its own process; yields its endpoint and checks a clean SIGTERM exit."""
    endpoint = local_endpoint(request.param, tmp_path_factory.mktemp("sock"))
    with served(endpoint, "--min-budget", "64", "--max-budget", "2048", "--output-windows", "64") as process:
        yield endpoint, process
    assert socket_files_left(endpoint) == []


def test_client_results_equal_encode_patches(server, expected):
    endpoint, _ = server
    with Client(endpoint) as client:
        check_model(client.model, BUDGETS)
        with client.encode(inputs()) as result:
            check(result, list(range(5)), expected)
        with client.encode([inputs()[1]], deadline_ms=60_000, priority=3) as result:
            check(result, [1], expected)


def test_four_clients_250_concurrent_requests_each_answered_once(server, expected):
    endpoint, _ = server
    items = inputs()

    async def one_client(seed: int) -> int:
        rng = np.random.default_rng(seed)
        plans = [sorted(rng.choice(len(items), size=rng.integers(1, 4), replace=False).tolist()) for _ in range(250)]
        async def one_request(plan: list[int]) -> None:
            while True:  # (a client holding results past its share while others wait is told to come back)
                try:
                    result = await client.encode([items[i] for i in plan])
                    break
                except EngineError as err:
                    if err.code != "overloaded":
                        raise
                    await asyncio.sleep(err.retry_after_ms / 1e3)
            with result:  # read, then release at once
                check(result, plan, expected)

        async with AsyncClient(endpoint) as client:
            answered = await asyncio.gather(*(one_request(plan) for plan in plans))  # all 250 in flight at once
        return len(answered)

    async def all_clients() -> list[int]:
        return await asyncio.gather(*(one_client(seed) for seed in range(4)))

    assert asyncio.run(all_clients()) == [250] * 4


def test_errors_come_back_with_codes(server, expected):
    endpoint, _ = server
    with Client(endpoint) as client:
        with pytest.raises(EngineError) as info:
            client.encode([np.zeros((8, 8), dtype=np.uint8)])
        assert info.value.code == "invalid_input"
        with pytest.raises(EngineError) as info:
            client.encode([np.zeros((4000, 4000, 3), dtype=np.uint8)])  # over 2 x the largest budget in tokens
        assert info.value.code == "too_large"
        with client.encode([inputs()[0]]) as result:  # the connection still serves
            check(result, [0], expected)


def test_embedded_engine_gives_the_same_results_and_cleans_up(expected):
    async def run() -> tuple[int, dict]:
        async with Engine(EngineConfig(window=WINDOW)) as engine:
            check_model(engine.model, BUDGETS)
            with await engine.encode(inputs()) as result:
                check(result, list(range(5)), expected)
            results = await asyncio.gather(*(engine.encode([inputs()[i % 5]]) for i in range(40)))
            for i, result in enumerate(results):
                check(result, [i % 5], expected)
                result.release()
            await asyncio.sleep(0.05)  # releases are delivered through the loop
            return os.getpid(), engine.stats()

    pid, stats = asyncio.run(run())
    left = {name: stats[name] for name in ("queued_items", "requests_open", "windows_in_flight", "slots_leased")}
    assert left == {"queued_items": 0.0, "requests_open": 0.0, "windows_in_flight": 0.0, "slots_leased": 0.0}
    assert slab_files(pid) == []


def test_embedded_engine_copies_to_an_output_device(expected):
    async def run() -> None:
        async with Engine(EngineConfig(window=WINDOW, output_device="cpu")) as engine:
            result = await engine.encode([inputs()[0]])
            assert result.released  # copied out: no slot stays leased
            check(result, [0], expected)
            await asyncio.sleep(0)  # the release runs on the loop
            assert engine.stats()["slots_leased"] == 0.0

    asyncio.run(run())


def test_worker_that_cannot_start_says_why(tmp_path: Path):
    async def run() -> None:
        async with Engine(EngineConfig(model=str(tmp_path / "missing"), window=WINDOW, startup_timeout_s=120)):
            pass

    with pytest.raises(RuntimeError, match=r"worker 0 .* failed to start: .*missing"):
        asyncio.run(run())


def test_releasing_a_running_request_cancels_it(expected):
    async def run() -> None:
        async with Engine(EngineConfig(window=WINDOW)) as engine:
            key, running = engine.submit(engine.admit([inputs()[3]] * 6), None, 0)
            await asyncio.sleep(0)
            engine.release(key)
            with pytest.raises(EngineError) as info:
                await running
            assert info.value.code == "cancelled"
            with await engine.encode([inputs()[0]]) as result:  # the engine goes on serving
                check(result, [0], expected)
            await asyncio.sleep(0.5)  # windows of the cancelled request finish and give their slots back
            assert engine.stats()["slots_leased"] == 0.0

    asyncio.run(run())


HOLDING_CLIENT = """
import os, sys
import numpy as np
from vitserve import Client
client = Client(sys.argv[1])
held = [client.encode([np.full((64, 64, 3), i, dtype=np.uint8)]) for i in range(3)]
print("holding", flush=True)
sys.stdin.readline()
os._exit(0)  # no release, no garbage collection: as if the process were killed
"""


def test_slots_of_a_client_that_exits_without_releasing_come_back(server):
    endpoint, _ = server
    client = subprocess.Popen([sys.executable, "-c", HOLDING_CLIENT, endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "holding"
    with Client(endpoint) as watcher:
        held = watcher.stats()["slots_leased"]
        if endpoint.startswith("ipc://"):
            assert held > 0  # local results stay in shared memory until released
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.wait(30) == 0
        for _ in range(100):  # the engine checks client processes every second
            if watcher.stats()["slots_leased"] == 0:
                break
            time.sleep(0.1)
        assert watcher.stats()["slots_leased"] == 0


def test_an_abandoned_stats_query_does_not_block_later_ones(server):
    endpoint, _ = server

    async def run() -> dict:
        async with AsyncClient(endpoint) as client:
            abandoned = asyncio.ensure_future(client.stats())
            await asyncio.sleep(0)  # sent; its reply has not come yet
            abandoned.cancel()
            return await asyncio.wait_for(client.stats(), 10)

    assert "slots_leased" in asyncio.run(run())
