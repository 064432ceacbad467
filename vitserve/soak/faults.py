"""Faults the soak run injects into a live engine on its schedule.

- kill-worker: SIGKILL one worker process (the engine must retry or fail its windows, restart it);
- kill-client: a client process that holds results and has requests queued is SIGKILLed (the
  engine must drop its queued items and reclaim its slots); each time a new one connects;
- cancel: requests given up on shortly after they were sent (see `run.py`);
- bad-input: malformed messages on a raw connection, each of which must get one coded error;
- overload: a burst of requests far past the queue bound (see `run.py`), answered with results
  or `overloaded`;
- hostile: every class of hostile peer once (hostile.py), each refused as it must be.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import msgspec
import numpy as np
import zmq

from vitserve.client import AsyncClient
from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import PROTOCOL_VERSION, Encode, Error, Hello, ImageItem

from .ledger import KNOWN_CODES, Ledger

LOCAL_ONLY = frozenset({"kill-worker", "kill-client"})  # they need the engine's processes on this host
REPLY_TIMEOUT_S = 10.0


async def kill_worker(client: AsyncClient, rng: random.Random) -> bool:
    """SIGKILL a running worker; False when none is up (all restarting)."""
    pids = (await client.health()).worker_pids
    if not pids:
        return False
    try:
        os.kill(rng.choice(pids), signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


async def kill_client(endpoint: str, rng: random.Random, ledger: Ledger) -> bool:
    """Start a client process that holds results and queues more, then SIGKILL it."""
    victim = await asyncio.create_subprocess_exec(sys.executable, "-m", "vitserve.soak.victim", endpoint,
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(victim.stdout.readline(), 60)
        if line.strip() != b"holding":
            ledger.violate(f"the client to be killed did not get its results (it said {line!r})")
            return False
        await asyncio.sleep(rng.uniform(0, 0.2))
        return True
    except asyncio.TimeoutError:
        ledger.violate("the client to be killed got no results within 60 s")
        return False
    finally:
        if victim.returncode is None:
            victim.kill()
        await victim.wait()


def malformed_messages() -> list[list[bytes]]:
    """Messages no engine may accept, each of which gets exactly one error reply."""
    codec = client_codec()
    image = np.zeros((8, 0, 3), dtype=np.uint8)  # zero width
    return [
        [b"\xff\x00 not msgpack"],
        [msgspec.msgpack.encode({"type": "no-such-message"})],
        codec.encode(Encode(1, [ImageItem(array_ref(np.zeros((8, 8, 3), np.uint8), 0))])),  # its frame is missing
        codec.encode(Encode(2, [ImageItem(array_ref(image, 0))]), [image]),
        codec.encode(Encode(3, [ImageItem(array_ref(np.zeros((8, 8, 3), np.uint8), 0))], deadline_ms=-5.0),
                     [np.zeros((8, 8, 3), np.uint8)]),
    ]


async def bad_input(endpoint: str, ledger: Ledger) -> bool:
    """Send malformed messages on a fresh raw connection; each must be answered with a coded error."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    codec = client_codec()
    try:
        socket.send_multipart(codec.encode(Hello(PROTOCOL_VERSION)))  # so that requests are looked at
        if not await asyncio.to_thread(socket.poll, int(REPLY_TIMEOUT_S * 1000)):
            ledger.violate("the malformed-message peer got no welcome")
            return False
        socket.recv_multipart()
        messages = malformed_messages()
        for frames in messages:
            socket.send_multipart(frames)
        for index in range(len(messages)):
            if not await asyncio.to_thread(socket.poll, int(REPLY_TIMEOUT_S * 1000)):
                ledger.violate(f"malformed message {index + 1} of {len(messages)} got no reply in {REPLY_TIMEOUT_S:g} s")
                return False
            reply, _ = codec.decode(socket.recv_multipart())
            if not isinstance(reply, Error) or reply.code not in KNOWN_CODES:
                ledger.violate(f"a malformed message was answered with {reply!r}")
        return True
    finally:
        socket.close(0)
        context.term()
