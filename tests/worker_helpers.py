"""Helpers of the worker tests on the CPU (real worker processes, the tiny model): images, checks
against the eager model, waiting for a condition, the engine's settings."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from vitserve import Engine, EngineConfig
from vitserve.ipc.messages import OutputRef
from vitserve.preprocess import preprocess_image
from vitserve.workers import WindowConfig

WINDOW = WindowConfig(min_budget=64, max_budget=512)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def image(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


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
