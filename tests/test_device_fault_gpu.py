"""A real CUDA error in a worker (`gpu`): the worker exits with its device-fault code instead of
answering, the engine restarts it in a new epoch, and the window's requests are retried there
and give the eager model's embeddings."""

from __future__ import annotations

import asyncio
import functools
import logging

import numpy as np
import pytest
import torch
from device_fault import faulting_worker_main

from vitserve import Engine, EngineConfig
from vitserve.engine import worker_handle
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image
from vitserve.workers import WindowConfig
from vitserve.workers.process import EXIT_DEVICE_FAULT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:tiny"


def test_a_cuda_error_restarts_the_worker_and_retries_its_window(tmp_path, monkeypatch, caplog):
    marker = tmp_path / "faulted"
    monkeypatch.setattr(worker_handle, "worker_main", functools.partial(faulting_worker_main, str(marker)))
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (64, 96, 128)]
    model = load_model(MODEL, device="cuda", dtype=torch.float32)
    expected = [model.encode_patches(*preprocess_image(picture)).embeddings.cpu() for picture in pictures]

    async def run() -> None:
        config = EngineConfig(model=MODEL, devices=("cuda:0",), dtype="float32",
                              window=WindowConfig(min_budget=64, max_budget=512))
        async with Engine(config) as engine:
            first_pid = engine.health().worker_pids[0]
            runs = [engine.run(engine.admit([picture]), None, 0) for picture in pictures]
            done = await asyncio.wait_for(asyncio.gather(*runs), 120)
            assert marker.exists(), "the first worker did not run the faulting entry point"
            health = engine.health()
            assert health.ready and health.worker_pids[0] != first_pid
            stats = engine.stats()
            assert stats["worker_restarts"] == 1.0 and stats["windows_retried"] >= 1.0
            for (key, (ref,)), want in zip(done, expected):
                assert ref.epoch == 1  # every window ran after the restart
                got = torch.from_numpy(np.array(engine.read(ref)[:, 0]))  # (tokens, out_hidden)
                cosine = torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0)
                assert got.shape == want.shape and cosine.item() >= 0.9999
                engine.release(key)

    with caplog.at_level(logging.ERROR, logger="vitserve"):
        asyncio.run(run())
    assert f"is lost (exit code {EXIT_DEVICE_FAULT})" in caplog.text
