"""The engine on a GPU (`gpu`): a CUDA worker preprocesses on the device, replays graphs, and
writes into pinned shared memory; results match the eager model and slabs are removed."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch
from slab_helpers import slab_files

from vitserve import Engine, EngineConfig
from vitserve.bench.load import until_settled
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image, preprocess_video
from vitserve.workers import WindowConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:qwen3-vl-2b"


def test_cuda_engine_matches_eager_model():
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((448, 448, 3), (336, 500, 3), (8, 224, 224, 3))]
    model = load_model(MODEL, device="cuda")
    expected = []
    for item in items:
        patches = preprocess_video(item) if item.ndim == 4 else preprocess_image(item)
        expected.append(model.encode_patches(patches.pixel_values, patches.grid_thw))
    del model

    async def run():
        config = EngineConfig(model=MODEL, devices=("cuda:0",), window=WindowConfig(min_budget=256, max_budget=4096))
        async with Engine(config) as engine:
            with await engine.encode(items) as result:
                for got, want in zip(result.items, expected):
                    for a, b in ((got.embeddings, want.embeddings), (got.deepstack, want.deepstack)):
                        assert a.dtype == torch.bfloat16 and a.isfinite().all()
                        cosine = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().cpu().flatten(), dim=0)
                        assert cosine.item() >= 0.9999
            results = await asyncio.gather(*(engine.encode([items[i % 3]], deadline_ms=10_000) for i in range(60)))
            for result in results:
                result.release()
            await asyncio.sleep(0.05)
            assert engine.stats()["slots_leased"] == 0.0
        return os.getpid()

    pid = asyncio.run(run())
    assert slab_files(pid) == []


def test_an_idle_cuda_worker_answers_its_readiness_probes_and_windows_go_on_among_them():
    """The probe, a one-block forward queued on the device like a window, is answered in order on a GPU
    too, and reports carry the worker-side stage timings (CUDA events)."""
    async def run():
        config = EngineConfig(model=MODEL, devices=("cuda:0",), window=WindowConfig(min_budget=256, max_budget=4096),
                              readiness_probe_s=0.2, readiness_timeout_s=2.0)
        image = np.random.default_rng(1).integers(0, 256, (448, 448, 3), dtype=np.uint8)
        async with Engine(config) as engine:
            await until_settled(engine.stats)  # (health names a worker still capturing graphs)
            for _ in range(3):
                (await engine.encode([image])).release()
                sent = engine.stats()["probes_sent"]
                for _ in range(200):  # an idle worker is probed within a few probe periods
                    if engine.stats()["probes_sent"] > sent:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.1)
            stats, health = engine.stats(), engine.health()
            assert stats["probes_sent"] >= 3 and stats["workers_unproven"] == 0
            assert health.ready and health.detail == "" and stats["gpu_busy_ms"] > 0
            stages = engine.latencies.snapshot()  # name -> (bounds, cumulative counts, sum)
            assert stages["preprocess"][1][-1] >= 3 and stages["preprocess"][2] > 0
            assert stages["output_transfer"][1][-1] >= 3

    asyncio.run(run())
