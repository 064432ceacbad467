"""Closing while a peer disconnects: neither the engine's frontend nor a client may hang in close().

libzmq sends a monitored socket's events to the monitor's PAIR from its I/O thread while holding the
lock that disabling the monitor takes; a send to a PAIR whose reader is closed blocks for ever. So a
close that shuts the reader before disabling the monitor hangs when a peer disconnects in between
(seen once in about 25 runs of the SIGTERM drain test). These tests put the disconnect exactly there."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import zmq
from served import served

from vitserve import AsyncClient
from vitserve.engine import EngineConfig
from vitserve.engine.frontend import Frontend

WAIT_S = 20


def finishes(work, timeout_s: float = WAIT_S) -> bool:
    """Whether `work()` returns within the timeout (run in a daemon thread: a hang is left behind)."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def test_the_frontend_closes_while_a_client_disconnects(tmp_path):
    frontend = Frontend(f"ipc://{tmp_path}/f.sock", EngineConfig())
    context = zmq.Context()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(frontend.endpoint)
    peer.send(b"hello?")  # the connection is up (an accepted event went to the monitor)
    time.sleep(0.2)
    reader_close = frontend._events.close

    def close_reader_then_disconnect(*args):
        reader_close(*args)
        peer.close(0)  # the disconnect lands right after the monitor's reader closed
        time.sleep(0.3)

    frontend._events.close = close_reader_then_disconnect
    assert finishes(frontend.close), "the frontend hung in close()"
    context.term()


def test_a_client_closes_while_its_engine_goes_away(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "512") as process:

        async def run() -> None:
            client = AsyncClient(endpoint, direct=False)  # ZeroMQ's socket and its monitor
            await client.connect()
            (await client.encode([np.zeros((64, 64, 3), np.uint8)])).release()
            link_close = client._transport.close_events

            def close_link_then_lose_the_engine(*args):
                link_close(*args)
                process.kill()  # the disconnect lands right after the link's reader closed
                process.wait()
                time.sleep(0.3)

            client._transport.close_events = close_link_then_lose_the_engine
            await client.close()

        assert finishes(lambda: asyncio.run(run())), "the client hung in close()"
