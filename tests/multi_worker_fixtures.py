"""Helpers shared by the tests of an engine with several CPU workers (test_multi_worker.py and
test_multi_worker_loss.py). They build the engine's config and requests of known token counts,
check results against the eager model, tell which worker (and epoch) wrote an item's rows, and
read the engine's HTTP endpoint. Every wait is bounded by WAIT_S, only so that a regression fails
instead of hanging."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import torch
from test_http_endpoint import get
from test_model_parity import eager

from vitserve import Engine, EngineConfig
from vitserve.engine.http_endpoint import HttpEndpoint
from vitserve.workers import WindowConfig

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
WAIT_S = 120.0  # the bound on any wait: only a regression comes near it
# Sides that the tiny model's preprocessing all resizes to a 16×16 patch grid (its minimum pixels):
# 256 tokens each, so two such images fill a window of the 512-token budget exactly. Full windows
# leave at once, which makes how a burst spreads over the workers predictable (see
# test_a_burst_is_spread_over_every_worker_and_the_counts_add_up in test_multi_worker.py).
SAME_TOKEN_SIDES = (64, 96, 128, 200, 256)


def config(workers: int = 2, **changes) -> EngineConfig:
    settings = dict(devices=("cpu",) * workers, window=WindowConfig(min_budget=64, max_budget=512),
                    max_item_tokens=4096)
    return EngineConfig(**(settings | changes))


def image(side: int, seed: int, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, width or side, 3), dtype=np.uint8)


def burst(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """`count` one-image requests of 256 tokens each (different pixels, different sides)."""
    return [[image(SAME_TOKEN_SIDES[i % len(SAME_TOKEN_SIDES)], seed + i)] for i in range(count)]


def check(result, items: list[np.ndarray], model) -> None:
    assert len(result.items) == len(items)
    for got, item in zip(result.items, items):
        torch.testing.assert_close(got.embeddings, eager(model, item), **TOLERANCE)


def served_by(ref) -> tuple[int, int]:
    """(worker, epoch) whose output slab holds an item's rows: each worker writes slabs of its own,
    named `vitserve-<pid>-w<worker>n<engine>-e<epoch>-<i>` (ipc/slabs.py slab_plan, engine/restarts.py)."""
    found = re.search(r"-w(\d+)n\d+-e(\d+)-\d+$", ref.slab)
    assert found, f"an output slab name that names no worker: {ref.slab!r}"
    return int(found.group(1)), int(found.group(2))


async def encode_all(engine: Engine, requests: list[list[np.ndarray]]) -> list:
    """Every request in flight at once (one asyncio.gather), bounded."""
    return await asyncio.wait_for(asyncio.gather(*(engine.encode(items) for items in requests)), WAIT_S)


async def scrape(engine: Engine, path: str) -> tuple[int, str]:
    """What `vitserve serve --http-port` answers on `path`, from the embedded engine's snapshot: the
    same endpoint, served from a thread while this loop takes the snapshot."""
    endpoint = HttpEndpoint("127.0.0.1", 0)
    endpoint.start(asyncio.get_running_loop(), engine.snapshot)
    try:
        return await asyncio.to_thread(get, endpoint.url + path)
    finally:
        endpoint.close()
