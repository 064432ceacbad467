"""Shared by the hostile-client tests (test_hostile_connections.py, test_hostile_bounds.py,
test_hostile_fairness.py): the engines they run against, a raw peer that may claim any routing
id, and small helpers to send encodes, wait for replies and read the engine's stats.

Three engines: `main` (options every test of a module shares), `flood` (started with a soft
descriptor limit of 1024, few connections, small byte bounds) and `pair` (two connections at
most, little output memory). They are module-scoped: a test module that assigns them to names of
its own (pytest finds fixtures by name in the module) gets its own engines, started once for it."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import zmq
from served import served
from zmq.utils.monitor import recv_monitor_message

from vitserve import Client
from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, Encode, Error, Hello, ImageItem, Release, Result, Stats, StatsQuery, Welcome,
)

SMALL = ("--min-budget", "64", "--max-budget", "512")
MAIN_QUEUED_ITEMS = 64  # one client's share (0.5 by default): 32 items
FLOOD_MAX_CONNECTIONS = 32
FLOOD_REQUEST_BYTES = 2 << 20
FLOOD_QUEUED_BYTES = 4 << 20
ROW_BYTES = 3 * 128 * 4  # tiny model: (1 + 2 deepstack) × 128 hidden, float32
SMALL_RESULT_BYTES = 64 * ROW_BYTES  # a 32×32 image is scaled up to 16×16 patches: 64 output rows
FLOOD_INLINE_BYTES = 2 * SMALL_RESULT_BYTES + SMALL_RESULT_BYTES // 2  # two small results, not three


def image(height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def path_of(endpoint: str) -> str:
    return endpoint.removeprefix("ipc://")


# -- engines ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def main(tmp_path_factory):
    """(endpoint, process). Big items are allowed (a 1536×1536 image takes a second or two here)."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/main.sock"
    with served(endpoint, *SMALL, "--max-item-tokens", "16384", "--max-queued-items", str(MAIN_QUEUED_ITEMS)) as process:
        yield endpoint, process


@pytest.fixture(scope="module")
def flood(tmp_path_factory):
    """Started with a soft descriptor limit of 1024 (the hard limit unchanged), as a login shell gives."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/flood.sock"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # inherited by `vitserve serve`
    try:
        context = served(endpoint, *SMALL, "--max-item-tokens", "4096", "--max-connections", str(FLOOD_MAX_CONNECTIONS),
                         "--max-request-bytes", str(FLOOD_REQUEST_BYTES), "--max-queued-bytes", str(FLOOD_QUEUED_BYTES),
                         "--max-inline-bytes", str(FLOOD_INLINE_BYTES))
        context.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield endpoint
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two connections at most; 1024 output rows per worker (8 windows of 128 rows; items up to
    1024 tokens, so the largest item does not make the slab larger)."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/pair.sock"
    with served(endpoint, *SMALL, "--max-connections", "2", "--output-windows", "8", "--max-item-tokens", "1024"):
        yield endpoint


# -- a raw peer, and helpers ------------------------------------------------------------------------

class Peer:
    """A raw DEALER like RawPeer, which may claim a routing id of its choice."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None, hello: bool = True,
                 context: zmq.Context | None = None):
        self.context = context or zmq.Context()
        self.own_context = context is None
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)
        self.codec = client_codec()
        if hello:
            self.send(Hello(PROTOCOL_VERSION))
            welcome = self.receive()[0]
            assert isinstance(welcome, Welcome), welcome

    def send(self, message, frames: list | None = None) -> None:
        self.socket.send_multipart(self.codec.encode(message, frames or []), copy=False)

    def receive(self, timeout_s: float = 30.0) -> tuple:
        assert self.socket.poll(int(timeout_s * 1000)), "the server stopped answering"
        return self.codec.decode(self.socket.recv_multipart(copy=False))

    def replies(self, wait_s: float) -> list:
        """Whatever arrives within `wait_s` seconds."""
        received, deadline = [], time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0 and self.socket.poll(int(left * 1000) + 1):
            received.append(self.codec.decode(self.socket.recv_multipart(copy=False))[0])
        return received

    def replies_until(self, kind: type, wait_s: float) -> list:
        """What arrives within `wait_s` seconds, up to the first message of type `kind`."""
        received, deadline = [], time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0 and self.socket.poll(int(left * 1000) + 1):
            received.append(self.codec.decode(self.socket.recv_multipart(copy=False))[0])
            if isinstance(received[-1], kind):
                break
        return received

    def close(self) -> None:
        self.socket.close(0)
        if self.own_context:
            self.context.term()


def encode_message(request_id: int, pixels: np.ndarray, inline: bool = False, priority: int = 0) -> Encode:
    return Encode(request_id, [ImageItem(array_ref(pixels, 0))], priority=priority, inline=inline)


def reply_to(peer, request_id: int, timeout_s: float = 30.0):
    """The reply to request `request_id`, skipping anything else."""
    deadline = time.monotonic() + timeout_s
    while True:
        message = peer.receive(max(0.1, deadline - time.monotonic()))[0]
        if getattr(message, "id", None) == request_id and isinstance(message, (Result, Error)):
            return message


def still_serves(endpoint: str) -> None:
    """A well-behaved client connects and gets a correct result."""
    with Client(endpoint) as client:
        with client.encode([image()]) as result:
            embeddings = result.items[0].embeddings
            assert tuple(embeddings.shape) == (64, 128) and bool(embeddings.isfinite().all())


def until_stats(endpoint: str, condition, what: str, timeout_s: float = 20.0) -> dict:
    with Client(endpoint) as client:
        deadline = time.monotonic() + timeout_s
        while not condition(stats := client.stats()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
            time.sleep(0.05)
    return stats


def disconnected(socket: zmq.Socket) -> zmq.Socket:
    """A monitor of `socket` that reports when its connection drops."""
    return socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)


def stop_watching(socket: zmq.Socket, monitor: zmq.Socket) -> None:
    """Disable the monitor, then close it: in the other order, a disconnect in between blocks libzmq's
    I/O thread for ever (a send to a PAIR without its reader, under the lock disabling takes)."""
    socket.disable_monitor()
    monitor.close(0)


def saw_disconnect(monitor: zmq.Socket, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000) + 1) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


# -- a welcomed peer on `main`, and what tests check with it ----------------------------------------

@pytest.fixture
def peer(main):
    peer = Peer(main[0])
    yield peer
    peer.close()


def barrier(peer: Peer) -> list:
    """Every reply before the answer to a stats query sent now."""
    peer.send(StatsQuery())
    replies = []
    while not isinstance(message := peer.receive()[0], Stats):
        replies.append(message)
    return replies


def works(peer: Peer, request_id: int = 999) -> None:
    pixels = image()
    peer.send(encode_message(request_id, pixels), [pixels])
    assert isinstance(reply_to(peer, request_id), Result)
    peer.send(Release([request_id]))
    assert barrier(peer) == []


def one_error(replies: list, request_id: int | None, code: str, *words: str) -> Error:
    assert len(replies) == 1, replies[:5]
    error = replies[0]
    assert isinstance(error, Error) and (error.id, error.code) == (request_id, code), error
    for word in words:
        assert word in error.message, error.message
    return error
