"""Clients never wait for ever: an engine killed or stopped is noticed by the connection's
heartbeat and every waiting request fails with `unavailable`; a request whose reply does not come
gives up at its deadline plus a margin (or the client's timeout) with `deadline_exceeded`; a
client outlives an engine restart on its endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pytest
from served import served

from vitserve import AsyncClient
from vitserve.client import REPLY_MARGIN_S
from vitserve.engine import EngineError

FLAGS = ("--min-budget", "64", "--max-budget", "512", "--max-item-tokens", "16384")
BIG = 1536  # one eager window of about a second on the CPU


def image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


@contextlib.contextmanager
def engine(endpoint: str):
    """A served engine that the test may kill or stop (it is continued before the block's end)."""
    with served(endpoint, *FLAGS) as process:
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)


async def failure_of(request, within_s: float) -> tuple[EngineError, float]:
    """The EngineError a pending request ends with, and how long after this call it came."""
    began = time.monotonic()
    with pytest.raises(EngineError) as info:
        await asyncio.wait_for(request, within_s)  # the old client waited for ever: this would time out
    return info.value, time.monotonic() - began


@pytest.mark.parametrize("direct", [True, False], ids=["direct-link", "zeromq"])
def test_a_killed_engine_fails_waiting_requests_at_once_and_a_restarted_one_serves_the_same_client(tmp_path, direct):
    endpoint = f"ipc://{tmp_path}/liveness.sock"

    async def run() -> None:
        with engine(endpoint) as process:
            async with AsyncClient(endpoint, direct=direct) as client:
                (await client.encode([image(64)])).release()
                waiting = [asyncio.ensure_future(client.encode([image(BIG, i)])) for i in range(2)]
                await asyncio.sleep(0.3)
                process.kill()
                process.wait(30)
                for request in waiting:
                    error, after_s = await failure_of(request, 10)
                    assert error.code == "unavailable" and "lost" in error.message
                    assert after_s < 5
                with engine(endpoint):  # the same client reconnects and says hello again by itself
                    with await asyncio.wait_for(client.encode([image(64, 1)]), 60) as result:
                        assert tuple(result.items[0].embeddings.shape) == (64, 128)
                    assert client.stray_replies == []

    asyncio.run(run())


@pytest.mark.parametrize("direct", [True, False], ids=["direct-link", "zeromq"])
def test_a_stopped_engine_is_noticed_within_a_few_heartbeats(tmp_path, direct):
    endpoint = f"ipc://{tmp_path}/stopped.sock"

    async def run() -> None:
        with engine(endpoint) as process:
            async with AsyncClient(endpoint, heartbeat_s=0.5, direct=direct) as client:
                running = asyncio.ensure_future(client.encode([image(BIG)]))
                await asyncio.sleep(0.3)
                os.kill(process.pid, signal.SIGSTOP)
                query = asyncio.ensure_future(client.health())
                for request in (running, query):
                    error, after_s = await failure_of(request, 20)
                    assert error.code == "unavailable"
                    assert after_s < 5  # three beats of 0.5 s, and the time to notice them

    asyncio.run(run())


def test_a_request_whose_reply_does_not_come_gives_up_after_its_deadline_or_the_timeout(tmp_path):
    endpoint = f"ipc://{tmp_path}/silent.sock"

    async def run() -> None:
        with engine(endpoint) as process:
            # heartbeats far apart: the engine's silence is seen only by the requests' own limits
            async with AsyncClient(endpoint, heartbeat_s=60, timeout_s=1.0) as client:
                os.kill(process.pid, signal.SIGSTOP)
                with_deadline = asyncio.ensure_future(client.encode([image(64)], deadline_ms=200))
                without = asyncio.ensure_future(client.encode([image(64, 1)]))
                probe = asyncio.ensure_future(client.health())  # queries too: a probe never hangs
                error, after_s = await failure_of(without, 10)
                assert error.code == "deadline_exceeded" and "timeout_s" in error.message
                assert 0.9 < after_s < 3
                error, after_s = await failure_of(probe, 10)
                assert error.code == "unavailable" and "health query" in error.message and "timeout_s" in error.message
                assert after_s < 3
                error, after_s = await failure_of(with_deadline, 20)
                assert error.code == "deadline_exceeded"
                assert 0.2 + REPLY_MARGIN_S - 1.5 < after_s < 0.2 + REPLY_MARGIN_S + 3
                os.kill(process.pid, signal.SIGCONT)
                # the engine answers the cancelled requests late; the client takes those replies
                # as theirs (releasing a result), never as strays, and serves on
                with await asyncio.wait_for(client.encode([image(64, 2)]), 60) as result:
                    assert tuple(result.items[0].embeddings.shape) == (64, 128)
                await asyncio.sleep(0.5)
                assert client.stray_replies == []
                assert (await client.stats())["slots_leased"] == 0
                assert (await client.health()).ready  # its own answer, not the late one of the probe

    asyncio.run(run())


def test_client_timeouts_are_checked():
    for bad in (dict(timeout_s=0), dict(timeout_s=float("nan")), dict(heartbeat_s=0), dict(heartbeat_s="1")):
        with pytest.raises(ValueError):
            AsyncClient("ipc:///nowhere", **bad)
