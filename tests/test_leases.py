"""Leases: results a client never releases are reclaimed `lease_timeout_s` after delivery, so
shared memory stays bounded whatever clients do; a late release is answered, not obeyed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from served import served

from vitserve import Client, Engine, EngineConfig
from vitserve.workers import WindowConfig

WINDOW = WindowConfig(min_budget=64, max_budget=1024)


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_embedded_results_not_released_are_reclaimed_after_the_lease():
    async def run() -> tuple[dict, dict, dict]:
        async with Engine(EngineConfig(window=WINDOW, lease_timeout_s=0.5)) as engine:
            kept = await engine.encode([image()])  # never released by us
            held = engine.stats()
            await asyncio.sleep(1.5)
            reclaimed = engine.stats()
            kept.release()  # late: harmless
            await asyncio.sleep(0.05)
            fresh = await engine.encode([image()])  # the engine goes on serving
            fresh.release()
            await asyncio.sleep(0.05)
            return held, reclaimed, engine.stats()

    held, reclaimed, after = asyncio.run(run())
    assert held["slots_leased"] > 0 and held["requests_open"] == 1
    assert reclaimed["slots_leased"] == 0 and reclaimed["requests_open"] == 0
    assert reclaimed["leases_expired"] == 1
    assert after["leases_expired"] == 1 and after["slots_leased"] == 0


def test_released_results_do_not_count_as_expired():
    async def run() -> dict:
        async with Engine(EngineConfig(window=WINDOW, lease_timeout_s=0.3)) as engine:
            for _ in range(3):
                (await engine.encode([image()])).release()
            await asyncio.sleep(1.0)
            return engine.stats()

    stats = asyncio.run(run())
    assert stats["leases_expired"] == 0 and stats["slots_leased"] == 0


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_lease_timeout_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="lease_timeout_s"):
        EngineConfig(lease_timeout_s=value)


def test_a_served_client_that_holds_results_past_the_lease_loses_them(tmp_path):
    endpoint = f"ipc://{tmp_path}/lease.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "1024", "--lease-timeout-s", "1"):
        with Client(endpoint) as client:
            hoarded = [client.encode([image()]) for _ in range(3)]
            assert client.stats()["slots_leased"] > 0
            deadline = time.monotonic() + 30
            while (stats := client.stats())["leases_expired"] < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert stats["leases_expired"] == 3 and stats["slots_leased"] == 0
            errors_before = stats["errors"]
            for result in hoarded:
                result.release()  # too late: the engine answers with an error, the client ignores it
            with client.encode([image()]) as result:
                assert result.items[0].embeddings.shape[0] == 64
            # one error per release message, however many ids it names (the client batches them)
            assert errors_before + 1 <= client.stats()["errors"] <= errors_before + 3
