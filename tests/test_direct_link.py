"""The direct link (ipc/direct.py): local clients talk to `vitserve serve` over a Unix socket beside
the endpoint, with the same results, limits and failure handling as over ZeroMQ; a peer that breaks
the stream's bounds loses its connection and nothing else; one that goes away frees what it held."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import numpy as np
import pytest
from served import served

from vitserve import AsyncClient, Client
from vitserve.client_direct import DirectTransport, ZmqTransport
from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.direct import COUNT, LENGTH, FrameSplitter, LinkBroken, link_path, message_buffers
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, Encode, Error, Hello, ImageItem, Ping, Pong, Release, Result, Stats, StatsQuery, Welcome,
)

FLAGS = ("--min-budget", "64", "--max-budget", "512")


def image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


# -- the stream's framing ------------------------------------------------------------------------
def test_messages_come_out_whole_however_the_stream_cuts_them():
    rng = random.Random(0)
    sent = [[bytes([i]) * rng.randrange(0, 300) for _ in range(rng.randrange(1, 6))] for i in range(50)]
    stream = b"".join(b"".join(bytes(b) for b in message_buffers(frames)) for frames in sent)
    splitter, received, at = FrameSplitter(8, 1 << 10, 1 << 12), [], 0
    while at < len(stream):
        step = rng.choice([1, 2, 7, 64, 1000])
        splitter.feed(stream[at:at + step], received)
        at += step
    assert [[bytes(frame) for frame in frames] for frames in received] == sent


@pytest.mark.parametrize("prefix", [
    COUNT.pack(0),
    COUNT.pack(9),
    COUNT.pack(2) + LENGTH.pack(2 << 10) + LENGTH.pack(0),  # a header over its bound
    COUNT.pack(2) + LENGTH.pack(10) + LENGTH.pack(1 << 62),  # a message over its bound
], ids=["no-frames", "too-many-frames", "header-too-large", "message-too-large"])
def test_a_prefix_past_the_bounds_breaks_the_stream_before_its_bytes_are_awaited(prefix):
    with pytest.raises(LinkBroken):
        FrameSplitter(8, 1 << 10, 1 << 20).feed(prefix, [])


# -- against an engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('direct')}/direct.sock"
    with served(endpoint, *FLAGS, "--max-connections", "3"):
        yield endpoint


class DirectPeer:
    """A raw connection to the direct link, sending any bytes."""

    def __init__(self, endpoint: str, hello: bool = True):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(30)
        self.socket.connect(link_path(endpoint.removeprefix("ipc://")))
        self.codec = client_codec()
        self.splitter, self.messages = FrameSplitter(4097, 1 << 30, 1 << 40), []
        if hello:
            self.send(Hello(PROTOCOL_VERSION))
            assert isinstance(self.receive()[0], Welcome)

    def send(self, message, arrays=()) -> None:
        self.socket.sendall(b"".join(bytes(b) for b in message_buffers(self.codec.encode(message, arrays))))

    def receive(self) -> tuple:
        while not self.messages:
            data = self.socket.recv(1 << 20)
            assert data, "the engine closed the connection"
            self.splitter.feed(data, self.messages)
        return self.codec.decode(self.messages.pop(0))

    def closed_by_the_engine(self) -> bool:
        try:
            while self.socket.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.socket.close()


def stats(endpoint: str) -> dict:
    with Client(endpoint) as client:
        return client.stats()


def test_a_local_client_takes_the_direct_link_and_gets_what_zeromq_gives(endpoint):
    items = [image(64), image(48, 1)[None].repeat(2, axis=0), (np.ones((64, 1536), np.float32), (1, 8, 8))]

    async def run() -> None:
        async with AsyncClient(endpoint) as direct, AsyncClient(endpoint, direct=False) as zeromq:
            assert isinstance(direct._transport, DirectTransport)
            assert isinstance(zeromq._transport, ZmqTransport)
            for inline in (False, True):
                direct.inline = zeromq.inline = inline
                with await direct.encode(items) as one, await zeromq.encode(items) as other:
                    for a, b in zip(one.items, other.items):
                        assert a.kind == b.kind and a.grid == b.grid
                        assert torch_equal(a.packed, b.packed)
            assert direct.stray_replies == []

    asyncio.run(run())


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_ping_is_answered_before_hello_and_anything_else_asks_for_hello(endpoint):
    peer = DirectPeer(endpoint, hello=False)
    try:
        peer.send(Ping())
        assert isinstance(peer.receive()[0], Pong)
        pixels = image(32)
        peer.send(Encode(1, [ImageItem(array_ref(pixels, 0))]), [pixels])
        reply = peer.receive()[0]
        assert isinstance(reply, Error) and reply.code == "protocol" and "hello" in reply.message
    finally:
        peer.close()


@pytest.mark.parametrize("garbage", [
    COUNT.pack(100_000),  # more frames than any request has
    COUNT.pack(1) + LENGTH.pack(1 << 40),  # more bytes than any request may have
], ids=["too-many-frames", "too-many-bytes"])
def test_a_peer_that_breaks_the_bounds_loses_its_connection_and_others_go_on(endpoint, garbage):
    honest, hostile = DirectPeer(endpoint), DirectPeer(endpoint)
    try:
        hostile.socket.sendall(garbage)
        assert hostile.closed_by_the_engine()
        pixels = image(32)
        honest.send(Encode(7, [ImageItem(array_ref(pixels, 0))]), [pixels])
        result = honest.receive()[0]
        assert isinstance(result, Result) and result.id == 7
        honest.send(Release([7]))
    finally:
        honest.close()
        hostile.close()


def test_connections_past_max_connections_are_refused_and_a_gone_peer_frees_its_rows(endpoint):
    before = stats(endpoint)
    peers = [DirectPeer(endpoint) for _ in range(3)]  # the limit, with the other tests' clients gone
    try:
        extra = DirectPeer(endpoint, hello=False)
        extra.send(Hello(PROTOCOL_VERSION))
        refusal = extra.receive()[0]
        assert isinstance(refusal, Error) and refusal.code == "overloaded"
        assert extra.closed_by_the_engine()
        pixels = image(32)
        peers[0].send(Encode(1, [ImageItem(array_ref(pixels, 0))]), [pixels])
        assert isinstance(peers[0].receive()[0], Result)  # held, never released
    finally:
        for peer in peers:
            peer.close()
    deadline = time.monotonic() + 10
    while (now := stats(endpoint))["slots_leased"] > before["slots_leased"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now["slots_leased"] == before["slots_leased"]
    assert now["connections"] == 1  # the stats client's own


def test_the_stats_of_a_direct_client_count_its_connection(endpoint):
    peer = DirectPeer(endpoint)
    try:
        peer.send(StatsQuery())
        reply = peer.receive()[0]
        assert isinstance(reply, Stats) and reply.values["connections"] >= 1
    finally:
        peer.close()


def test_a_client_started_before_its_engine_waits_for_it_and_takes_the_direct_link(tmp_path):
    endpoint = f"ipc://{tmp_path}/later.sock"

    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            assert isinstance(client._transport, DirectTransport)
            with await client.encode([image(64)]) as result:
                assert tuple(result.items[0].embeddings.shape) == (64, 128)

    outcome = []
    early = threading.Thread(target=lambda: outcome.append(run_catching(run)))
    early.start()
    time.sleep(0.5)  # the client is waiting for the endpoint
    with served(endpoint, *FLAGS):
        early.join(120)
    assert outcome == [None], outcome


def run_catching(coroutine_function) -> BaseException | None:
    try:
        asyncio.run(coroutine_function())
    except BaseException as error:  # the test's thread reports it to the test
        return error
    return None
