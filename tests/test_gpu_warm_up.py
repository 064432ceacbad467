"""On a GPU (`gpu`): a runner that serves while it warms up (graphs captured one by one, the cost
model measured last) gives the same embeddings before, during and after; an engine serves before
its worker is warm, and a standby process replaces a killed worker."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:qwen3-vl-2b"
# Items packed in one bf16 window and the same items run alone differ by accumulation order; the
# smallest items here (16 output rows) show it most. Wrong or stale rows give far less.
MIN_COSINE = 0.9998


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def random_grids(rng: random.Random, tokens: int) -> list[tuple[int, int, int]]:
    grids, total = [], 0
    while total < tokens:
        grid = (rng.choice([1, 1, 2]), 2 * rng.randint(4, 16), 2 * rng.randint(4, 16))
        grids.append(grid)
        total += grid[0] * grid[1] * grid[2]
    return grids


def test_windows_during_the_warm_up_match_per_item_eager_and_use_each_graph_once_it_is_there():
    from vitserve.models import load_model
    from vitserve.workers import ModelRunner, WindowConfig

    runner = ModelRunner(load_model(MODEL, device="cuda"), WindowConfig(min_budget=256, max_budget=2048))
    steps = runner.warm_up()  # nothing known: eager timings first, the full cost model last
    next(steps)
    assert runner.cost.eager_base_points and not runner.cost.padded_base_ms and not runner.graphs.graphs
    rng, worst, windows = random.Random(0), 1.0, 0
    finished, after = False, 0  # windows after the last step: until one has replayed a graph (20 at most)
    while not finished or (after < 20 and not runner.stats.graph_replays):
        grids = random_grids(rng, rng.choice([100, 300, 900, 1800]))
        pixels = torch.rand(sum(t * h * w for t, h, w in grids), 1536, device="cuda") * 2 - 1
        result = runner.encode(pixels, grids)
        windows += 1
        start = 0
        for index, grid in enumerate(grids):
            rows = grid[0] * grid[1] * grid[2]
            alone = runner.model.encode_patches(pixels[start:start + rows], [grid])
            start += rows
            ours = result.embeddings(index).to("cuda")
            assert ours.isfinite().all()
            worst = min(worst, cosine(ours, alone.embeddings), cosine(result.deepstack(index).to("cuda"), alone.deepstack))
        if finished:
            after += 1
        else:
            finished = next(steps, StopIteration) is StopIteration
    assert worst >= MIN_COSINE
    assert runner.stats.graph_replays > 0
    assert set(runner.cost.padded_base_ms) == set(runner.padded_shapes())  # measured whole, at the end
    assert runner.cost.attention_ms_per_token2 > 0
    assert runner.stats.eager_runs["not_captured"] > 0  # windows ran before their graphs were there
    print(f"\n{windows} windows through the warm-up: worst cosine {worst:.6f}")


def test_the_engine_serves_while_its_worker_warms_up_and_a_standby_replaces_a_killed_worker(tmp_path):
    from vitserve import Engine, EngineConfig
    from vitserve.models import load_model
    from vitserve.preprocess import preprocess_image
    from vitserve.workers import WindowConfig

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (224, 448, 336)]
    model = load_model(MODEL, device="cuda")
    expected = [model.encode_patches(*preprocess_image(image)).embeddings.cpu() for image in images]
    del model

    async def check(engine) -> None:
        with await engine.encode(images) as result:
            for got, want in zip(result.items, expected):
                assert cosine(got.embeddings, want) >= MIN_COSINE

    async def until(condition, what: str, timeout_s: float = 300.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def run() -> None:
        config = EngineConfig(model=MODEL, devices=("cuda:0",), cache_dir=str(tmp_path),
                              window=WindowConfig(min_budget=256, max_budget=4096))
        async with Engine(config) as engine:
            assert engine.stats()["workers_warming"] == 1  # ready before its graphs
            await check(engine)
            await until(lambda: engine.stats()["workers_warming"] == 0, "the warm-up")
            await check(engine)
            assert list((tmp_path / "cost").iterdir())  # the measured cost model is kept
            worker = engine.health().worker_pids[0]
            os.kill(worker, signal.SIGKILL)
            await until(lambda: engine.stats()["worker_restarts"] == 1, "the restart")
            assert engine.health().worker_pids[0] != worker
            await check(engine)  # eagerly or on graphs already captured
            await until(lambda: engine.stats()["workers_warming"] == 0, "the restarted worker's warm-up")
            await check(engine)

    asyncio.run(run())
