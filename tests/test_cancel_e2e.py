"""Cancellation over the wire, against a live `vitserve serve`: a client that gives up on a request,
and a client process that vanishes, get their queued items dropped (never sent to a worker), the
results of windows already running discarded, and their slots back."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from served import served

from vitserve import AsyncClient

FLAGS = ("--min-budget", "64", "--max-budget", "512", "--max-item-tokens", "16384", "--output-windows", "64")
BIG = 1536  # one eager window of about a second on the CPU: what is sent after it waits in the queue


def image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('cancel')}/vitserve.sock"
    with served(endpoint, *FLAGS):
        yield endpoint


async def settled(client: AsyncClient, timeout_s: float = 30.0) -> dict:
    """Stats once nothing is open, queued or in flight."""
    for _ in range(int(timeout_s / 0.05)):
        stats = await client.stats()
        if stats["requests_open"] == stats["queued_items"] == stats["windows_in_flight"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine did not settle: {stats}")


def test_cancelled_queued_requests_never_reach_a_worker(endpoint):
    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            before = await settled(client)
            # Two big windows fill the worker's two in-flight places; the small ones wait in the queue.
            blockers = [asyncio.ensure_future(client.encode([image(BIG, i)])) for i in range(2)]
            queued = [asyncio.ensure_future(client.encode([image(64, i)])) for i in range(5)]
            await asyncio.sleep(0)
            await client.stats()  # all admitted
            for task in queued:
                task.cancel()
            for blocker in blockers:
                (await blocker).release()
            for task in queued:
                with pytest.raises(asyncio.CancelledError):
                    await task
            after = await settled(client)
            assert after["items_sent"] - before["items_sent"] == 2  # only the big ones ran
            assert after["slots_leased"] == 0
            with await client.encode([image(64, 9)]) as result:  # the connection goes on
                assert result.items[0].embeddings.shape == (64, 128)

    asyncio.run(run())


def test_a_request_cancelled_while_its_window_runs_gives_its_slots_back(endpoint):
    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            running = asyncio.ensure_future(client.encode([image(BIG, 2)]))
            while (await client.stats())["windows_in_flight"] == 0:
                await asyncio.sleep(0.01)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            after = await settled(client)
            assert after["slots_leased"] == 0 and after["requests_open"] == 0

    asyncio.run(run())


VANISHING_CLIENT = """
import asyncio, os, sys
import numpy as np
from vitserve import AsyncClient

async def main():
    client = AsyncClient(sys.argv[1])
    await client.connect()
    big = np.zeros((1536, 1536, 3), dtype=np.uint8)
    small = [np.full((64, 64, 3), i, dtype=np.uint8) for i in range(6)]
    tasks = [asyncio.ensure_future(client.encode([big]))]
    tasks += [asyncio.ensure_future(client.encode([image])) for image in small]
    await asyncio.sleep(0)
    await client.stats()  # every request is admitted
    print("sent", flush=True)
    await asyncio.sleep(0.2)
    os._exit(0)  # vanish: no cancel, no release

asyncio.run(main())
"""


def test_a_client_that_vanishes_has_its_queued_items_dropped_and_slots_freed(endpoint):
    async def run() -> None:
        async with AsyncClient(endpoint) as watcher:
            before = await settled(watcher)
            victim = subprocess.run([sys.executable, "-c", VANISHING_CLIENT, endpoint], capture_output=True,
                                    text=True, timeout=60)
            assert victim.stdout.strip() == "sent", victim.stderr
            after = await settled(watcher)
            assert after["slots_leased"] == 0
            assert after["items_sent"] - before["items_sent"] < 7  # the queued ones were dropped, not run

    asyncio.run(run())
