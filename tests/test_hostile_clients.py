"""Hostile or careless clients against a live `vitserve serve`: each test shows that one class of
misbehaviour is contained. The engine stays up (every served process must exit 0 on SIGTERM),
other clients keep being served, and what a client may take (connections, descriptors,
routing ids, memory, queue, output rows, log lines) stays bounded.

Three engines are started for the whole module: `main` (options every test of it shares),
`flood` (started with a soft descriptor limit of 1024, few connections, small byte bounds) and
`pair` (two connections at most, little output memory)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import socket as sockets
import struct
import time

import msgspec
import numpy as np
import pytest
import zmq
from served import served
from zmq.utils.monitor import recv_monitor_message

from vitserve import AsyncClient, Client
from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, ArrayRef, Cancel, Encode, Error, Health, HealthQuery, Hello, ImageItem, Release, Result, Stats,
    StatsQuery, Welcome,
)

try:
    from vitserve.ipc.messages import MAX_ITEMS_PER_REQUEST, MAX_RELEASE_IDS
except ImportError:  # an engine from before the protocol bounded its element counts
    MAX_ITEMS_PER_REQUEST = MAX_RELEASE_IDS = 4096

SMALL = ("--min-budget", "64", "--max-budget", "512")
MAIN_QUEUED_ITEMS = 64  # one client's share (0.5 by default): 32 items
HELLO_TIMEOUT_S = 10.0  # connections.HELLO_TIMEOUT_S: the server's, not settable from here
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
    """Two connections at most; 1024 output rows per worker (8 windows of 128 rows)."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/pair.sock"
    with served(endpoint, *SMALL, "--max-connections", "2", "--output-windows", "8"):
        yield endpoint


# -- helpers ----------------------------------------------------------------------------------------

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


def claim(endpoint: str, routing_id: bytes, attempts: int = 10) -> Peer:
    """A peer welcomed under `routing_id`, which a connection that just closed held. Until the
    ROUTER has seen that close, libzmq takes a newcomer under the same id for a duplicate: it
    keeps the connection unnamed and names it later by the bytes of its first message (the
    hello, swallowed). So a newcomer that gets no welcome soon tries again on a new connection."""
    for _ in range(attempts):
        peer = Peer(endpoint, routing_id, hello=False)
        peer.send(Hello(PROTOCOL_VERSION))
        replies = peer.replies_until(Welcome, 2.0)
        if replies and isinstance(replies[-1], Welcome):
            assert len(replies) == 1, replies
            return peer
        peer.close()
    pytest.fail(f"no welcome under a reused routing id in {attempts} attempts")


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


def saw_disconnect(monitor: zmq.Socket, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000) + 1) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


def new_stderr(process) -> str:
    """What the served process wrote to stderr since the last call (without blocking)."""
    fd = process.stderr.fileno()
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.set_blocking(fd, True)
    return b"".join(chunks).decode(errors="replace")


def glibc_rand_outputs(count: int) -> list[int]:
    """The first outputs of the C library's rand() in a process that never seeded it (as srand(1))."""
    libc = ctypes.CDLL(None)
    libc.srand(1)
    outputs = [libc.rand() for _ in range(count)]
    libc.srand(int.from_bytes(os.urandom(4), "little"))  # leave this process's rand() unpredictable again
    return outputs


# -- 1. routing ids ---------------------------------------------------------------------------------

CANDIDATE_STARTS = 64  # rand() outputs consumed before the ROUTER is made: 0 in `vitserve serve` (checked)
IDS_PER_START = 4


def test_routing_ids_claimed_ahead_of_the_generated_ones_do_not_abort_the_engine(main):
    """libzmq names a peer that chooses no routing id b"\\x00" + a 4-byte counter, which starts at
    rand() | (rand() & 1) << 31 when the ROUTER is made, and asserts (aborting the process) when
    that name is already taken. With rand() never seeded, the start is known in advance: peers
    that claim the next names bring the engine down as soon as an anonymous peer connects. This
    test runs first on its engine, so that no anonymous peer has taken a name before."""
    endpoint, process = main
    outputs = glibc_rand_outputs(CANDIDATE_STARTS + 1)
    starts = [(outputs[i] | (outputs[i + 1] & 1) << 31) & 0xFFFFFFFF for i in range(CANDIDATE_STARTS)]
    claimed = {b"\x00" + struct.pack(">I", (start + k) & 0xFFFFFFFF) for start in starts for k in range(IDS_PER_START)}
    context = zmq.Context()
    hostile = [Peer(endpoint, routing_id, hello=False, context=context) for routing_id in claimed]
    anonymous: list[zmq.Socket] = []
    try:
        for peer in hostile:  # a reply proves the ROUTER holds the peer under its claimed name
            peer.send(HealthQuery())
        for peer in hostile:
            assert isinstance(peer.receive(10)[0], Health)
        codec = client_codec()
        for _ in range(4):  # named by the ROUTER's counter
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            socket.send_multipart(codec.encode(Hello(PROTOCOL_VERSION)))
            anonymous.append(socket)
        for socket in anonymous:
            assert socket.poll(10_000), f"no welcome for an anonymous peer (engine exit code {process.poll()})"
            assert isinstance(codec.decode(socket.recv_multipart())[0], Welcome)
        assert process.poll() is None
        still_serves(endpoint)
    finally:
        for peer in hostile:
            peer.close()
        for socket in anonymous:
            socket.close(0)
        context.term()
    assert process.poll() is None  # and `served` checks that it exits cleanly on SIGTERM


# -- 2. a routing id claimed by a second connection ---------------------------------------------------

def test_a_connection_that_claims_a_closed_clients_routing_id_reaches_nothing_of_it(main):
    """A asks for a big encode and leaves before its result; B connects under A's routing id.
    B must not receive A's result, nor release or cancel it; A's rows are freed because A left."""
    endpoint, _ = main
    routing_id = b"\x01" + os.urandom(15)
    big = image(1536, 1536)  # 9216 patch tokens: a second or two of CPU work
    a = Peer(endpoint, routing_id)
    a.send(encode_message(77, big), [big])
    a.send(HealthQuery())  # answered after the encode was admitted: messages are handled in order
    assert isinstance(a.receive()[0], Health)
    a.close()
    b = claim(endpoint, routing_id)
    try:
        until_stats(endpoint, lambda s: s["queued_items"] == 0 and s["windows_in_flight"] == 0, "A's encode to end",
                    timeout_s=60)
        replies = b.replies(0.5)  # a result of A's would have been sent as its window ended
        assert not [r for r in replies if isinstance(r, Result)], f"B received A's result: {replies}"
        b.send(Cancel(77))
        b.send(Release([77]))
        b.send(StatsQuery())
        answers = []
        while not isinstance(message := b.receive()[0], Stats):
            answers.append(message)
        assert len(answers) == 1 and isinstance(answers[0], Error), answers
        assert (answers[0].id, answers[0].code) == (77, "invalid_input") and "holds nothing" in answers[0].message
    finally:
        b.close()
    until_stats(endpoint, lambda s: s["slots_leased"] == 0 and s["requests_open"] == 0, "A's rows to be freed")


# -- 3. connection floods -------------------------------------------------------------------------------

FLOOD_CONNECTIONS = 3000  # well past the 1024 descriptors the engine was started with


def connect_now(connection: sockets.socket, path: str, deadline: float) -> bool:
    """Connect as soon as the listener's backlog has room; False when refused."""
    while True:
        try:
            connection.connect(path)
            return True
        except BlockingIOError:  # the backlog is full: the engine accepts as fast as it can
            assert time.monotonic() < deadline, "the engine stopped accepting connections"
            time.sleep(0.0005)
        except OSError:
            return False


def test_a_flood_of_raw_connections_past_the_descriptor_limit_is_shed(flood):
    """libzmq aborts when an ipc:// accept finds no descriptor left; the engine raises its soft
    limit and shuts connections past 2 × max_connections as soon as they are accepted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD_CONNECTIONS + 256:
        pytest.skip(f"this test needs {FLOOD_CONNECTIONS + 256} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opened: list[sockets.socket] = []
    try:
        deadline = time.monotonic() + 30
        for _ in range(FLOOD_CONNECTIONS):
            connection = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            connection.setblocking(False)
            if not connect_now(connection, path_of(flood), deadline):  # refused: the engine is gone (checked below)
                connection.close()
                break
            opened.append(connection)
        time.sleep(1.0)
    finally:
        for connection in opened:
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(opened) == FLOOD_CONNECTIONS, f"connections were refused after {len(opened)}: the engine is gone"
    still_serves(flood)
    stats = until_stats(flood, lambda s: s["connections"] <= 2, "the flood's connections to be forgotten")
    assert stats["connections_opened"] >= FLOOD_CONNECTIONS
    assert stats["connections_refused"] >= FLOOD_CONNECTIONS - 2 * FLOOD_MAX_CONNECTIONS  # shed at once


def test_connections_past_max_connections_are_refused_with_the_setting_named(pair):
    first, second = Client(pair), Client(pair)
    try:
        with pytest.raises(ConnectionError, match="max_connections"):
            Client(pair)
        with first.encode([image()]) as result:  # those admitted are served as before
            assert tuple(result.items[0].embeddings.shape) == (64, 128)
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 10
    while True:  # the two closes reach the engine soon; then a newcomer is served
        try:
            still_serves(pair)
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "connections that closed still count against max_connections"
            time.sleep(0.2)


def test_the_delayed_shut_of_a_refused_connection_never_hits_the_connection_that_reuses_its_descriptor(flood):
    """A connection refused for max_connections is shut REFUSAL_LINGER_S (1 s) after its refusal.
    If it leaves before that and a newcomer is accepted on the same descriptor number (the kernel
    hands out the lowest free one), the newcomer, welcomed meanwhile, must not be shut in its place.
    Fillers take the descriptor numbers below the refused connection's, so that its number is the
    lowest free one when the newcomer arrives."""
    fillers = []
    context = zmq.Context()
    admitted: list[Peer] = []
    try:
        for _ in range(8):  # unnamed holes in the engine's descriptor table (shut after the hello timeout)
            filler = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            filler.connect(path_of(flood))
            fillers.append(filler)
        admitted = [Peer(flood, context=context) for _ in range(FLOOD_MAX_CONNECTIONS - 1)]
        refused = Peer(flood, hello=False, context=context)
        admitted.append(refused)  # to be closed at the end, whatever happens
        refused.send(HealthQuery())  # accepted now, before the last admitted connection
        assert isinstance(refused.receive()[0], Health)
        last = Peer(flood, context=context)  # the engine's limit is reached
        admitted.append(last)
        refused.send(Hello(PROTOCOL_VERSION))
        error = refused.receive()[0]
        assert isinstance(error, Error) and "max_connections" in error.message, error
        refused_at = time.monotonic()
        refused.close()
        last.close()
        watcher = admitted[0]
        while True:  # both closes are seen: every slot but one is taken, and the refused descriptor is free
            watcher.send(StatsQuery())
            if watcher.receive()[0].values["connections"] == len(fillers) + FLOOD_MAX_CONNECTIONS - 1:
                break
            assert time.monotonic() - refused_at < 0.9, "the engine did not see two connections close in time"
        newcomer = Peer(flood, context=context)
        admitted.append(newcomer)
        assert time.monotonic() - refused_at < 0.9, "too slow to test the refusal's delayed shut"
        monitor = disconnected(newcomer.socket)
        try:
            assert not saw_disconnect(monitor, max(0.1, refused_at + 2.0 - time.monotonic())), \
                "the engine shut a welcomed connection: the delayed shut of a refused one that had left"
        finally:
            monitor.close(0)
        works(newcomer)
    finally:
        for peer in admitted:
            peer.close()
        for filler in fillers:
            filler.close()
        context.term()


# -- 4. bounds --------------------------------------------------------------------------------------------

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


def test_a_release_of_more_ids_than_the_protocol_allows_is_refused_in_one_reply(peer):
    began = time.monotonic()
    peer.send(Release(list(range(1, MAX_RELEASE_IDS + 2))))
    replies = barrier(peer)
    assert time.monotonic() - began < 1.0
    one_error(replies, None, "protocol", str(MAX_RELEASE_IDS))
    works(peer)


def test_an_encode_header_claiming_five_million_items_is_refused_by_its_count(peer):
    """The header says 5,000,000 items (and holds as many as fit 1 MiB): refused for its count,
    naming the bound, before any item is built."""
    packed = msgspec.msgpack.encode
    item = packed(ImageItem(ArrayRef(0, "uint8", (1, 1, 3))))
    header = (b"\x83" + packed("type") + packed("encode") + packed("id") + packed(5) + packed("items")
              + b"\xdd" + struct.pack(">I", 5_000_000) + item * ((900 << 10) // len(item)))
    began = time.monotonic()
    peer.socket.send_multipart([header, b"\x00\x00\x00"])
    replies = barrier(peer)
    assert time.monotonic() - began < 1.0
    one_error(replies, None, "protocol", str(MAX_ITEMS_PER_REQUEST))
    works(peer)


def test_a_release_of_thousands_of_unknown_ids_gets_one_reply(peer):
    peer.send(Release(list(range(10_000, 14_000))))
    one_error(barrier(peer), 10_000, "invalid_input", "holds nothing", "3999 more")
    works(peer)


def test_a_message_of_ten_thousand_frames_shuts_its_connection(main):
    endpoint, _ = main
    hostile = Peer(endpoint)
    monitor = disconnected(hostile.socket)
    try:
        hostile.socket.send_multipart([hostile.codec.encode(StatsQuery())[0], *([b""] * 9_999)])
        assert saw_disconnect(monitor, 5.0), "the connection was not shut"
        assert hostile.replies(0.5) == [], "a message past the protocol's frame bound was answered"
    finally:
        monitor.close(0)
        hostile.close()
    fresh = Peer(endpoint)
    try:
        works(fresh)
    finally:
        fresh.close()


def test_a_peer_that_has_not_said_hello_gets_only_health(main):
    endpoint, _ = main
    stranger = Peer(endpoint, hello=False)
    try:
        pixels = image()
        stranger.send(encode_message(3, pixels), [pixels])
        one_error([stranger.receive()[0]], 3, "protocol", "hello first")
        stranger.send(StatsQuery())
        one_error([stranger.receive()[0]], None, "protocol", "hello first")
        stranger.send(HealthQuery())
        assert isinstance(stranger.receive()[0], Health)
        assert stranger.replies(0.3) == []  # the encode was not run: no result follows
    finally:
        stranger.close()


def test_connections_that_never_say_hello_are_shut(main):
    """A raw stream that never completes ZeroMQ's handshake (libzmq's own timeout would be 30 s),
    and a ZeroMQ peer that never says hello (never closed before), are both shut after the hello timeout."""
    endpoint, _ = main
    raw = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    silent = Peer(endpoint, hello=False)
    monitor = disconnected(silent.socket)
    try:
        raw.connect(path_of(endpoint))
        raw.settimeout(HELLO_TIMEOUT_S + 5)
        began = time.monotonic()
        try:
            while raw.recv(4096):  # the server's greeting, then the end of the stream
                pass
        except TimeoutError:
            pytest.fail(f"a raw connection that sent nothing is still open after {HELLO_TIMEOUT_S + 5:.0f} s")
        assert time.monotonic() - began < HELLO_TIMEOUT_S + 5
        assert saw_disconnect(monitor, max(0.1, began + HELLO_TIMEOUT_S + 5 - time.monotonic())), \
            "a ZeroMQ peer that never said hello is still connected"
    finally:
        raw.close()
        monitor.close(0)
        silent.close()
    still_serves(endpoint)


def test_connections_that_come_and_go_leave_nothing_behind(main):
    endpoint, _ = main
    with Client(endpoint) as observer:
        before = observer.stats()
        context, codec = zmq.Context(), client_codec()
        try:
            for _ in range(200):
                socket = context.socket(zmq.DEALER)
                socket.setsockopt(zmq.LINGER, 0)
                socket.connect(endpoint)
                socket.send_multipart(codec.encode(Hello(PROTOCOL_VERSION)))
                assert socket.poll(10_000) and isinstance(codec.decode(socket.recv_multipart())[0], Welcome)
                socket.close(0)
        finally:
            context.term()
        deadline = time.monotonic() + 10
        while (after := observer.stats())["connections"] != before["connections"]:
            assert time.monotonic() < deadline, f"connection records left behind: {before} -> {after}"
            time.sleep(0.05)
        assert after["connections_opened"] >= before["connections_opened"] + 200


def test_inputs_of_unfinished_requests_are_bounded_across_clients(flood):
    """Three clients each send one input of 1.5 MiB (within a client's share) at once; whichever
    comes third would take unfinished inputs past max_queued_bytes (4 MiB) and is refused, until
    the others' requests have finished."""
    pixels = image(724, 724)  # 1.5 MiB, about 2000 patch tokens each: these take a while here
    peers = [Peer(flood) for _ in range(3)]
    try:
        for request_id, peer in enumerate(peers, 1):  # back to back: the first two are far from done
            peer.send(encode_message(request_id, pixels), [pixels])
        replies = [reply_to(peer, request_id) for request_id, peer in enumerate(peers, 1)]
        refused = [(peer, reply) for peer, reply in zip(peers, replies) if isinstance(reply, Error)]
        assert len(refused) == 1, replies  # the three reach the engine in any order
        assert sum(isinstance(reply, Result) for reply in replies) == 2, replies
        late, error = refused[0]
        assert error.code == "overloaded" and "max_queued_bytes" in error.message, error
        assert error.retry_after_ms is not None, error
        for request_id, (peer, reply) in enumerate(zip(peers, replies), 1):
            if isinstance(reply, Result):
                peer.send(Release([request_id]))
        late.send(encode_message(4, pixels), [pixels])  # the others' inputs are gone now
        assert isinstance(reply_to(late, 4), Result)
        late.send(Release([4]))
        for peer in peers:
            assert barrier(peer) == []
    finally:
        for peer in peers:
            peer.close()


def test_inline_results_a_client_does_not_release_are_bounded(flood):
    """Inline results are copied into the reply; their bytes count against the client until it
    releases them. Past max_inline_bytes its results are refused; releasing brings them back."""
    greedy = Peer(flood)
    try:
        for request_id in (1, 2):
            pixels = image(seed=request_id)
            greedy.send(encode_message(request_id, pixels, inline=True), [pixels])
            result = reply_to(greedy, request_id)
            assert isinstance(result, Result) and result.outputs[0].frame == 0 and not result.outputs[0].slab
        pixels = image(seed=3)
        greedy.send(encode_message(3, pixels, inline=True), [pixels])
        refused = reply_to(greedy, 3)
        assert isinstance(refused, Error) and refused.code == "overloaded", refused
        assert "max_inline_bytes" in refused.message, refused
        greedy.send(Release([1, 2]))
        assert barrier(greedy) == []  # both acknowledged: no error for either
        greedy.send(encode_message(4, pixels, inline=True), [pixels])
        assert isinstance(reply_to(greedy, 4), Result)
        greedy.send(Release([4]))
        assert barrier(greedy) == []
    finally:
        greedy.close()
    until_stats(flood, lambda s: s["slots_leased"] == 0, "inline results' rows to be freed")


def test_a_flood_of_undecodable_messages_costs_a_few_log_lines(main):
    endpoint, process = main
    new_stderr(process)  # what earlier tests made it log
    hostile = Peer(endpoint)
    try:
        for _ in range(2000):
            hostile.socket.send_multipart([b"\xc1\xff"])
        barrier(hostile)  # every message was handled (some replies may have been dropped: not read in time)
        works(hostile)
    finally:
        hostile.close()
    lines = new_stderr(process).splitlines()
    assert len(lines) <= 5, "\n".join(lines[:20])


# -- 5. fairness -------------------------------------------------------------------------------------------

def test_a_priority_outside_the_allowed_range_is_refused(peer):
    pixels = image()
    peer.send(encode_message(8, pixels, priority=-2**62), [pixels])
    error = one_error([reply_to(peer, 8)], 8, "invalid_input", "priorities")
    assert "-100" in error.message
    assert barrier(peer) == []
    works(peer)


def test_a_clients_backlog_does_not_delay_another_clients_single_request(main):
    endpoint, _ = main
    backlog_size = 30
    big = image(512, 512)  # 1024 patch tokens: more than a window, each encoded alone

    async def run() -> tuple[int, list[int]]:
        async with AsyncClient(endpoint) as busy, AsyncClient(endpoint) as newcomer:
            finished: list[int] = []

            async def one(index: int) -> None:
                with await busy.encode([big]) as result:
                    assert tuple(result.items[0].embeddings.shape) == (256, 128)
                finished.append(index)

            requests = (await newcomer.stats())["requests"]  # counted by the engine as they arrive
            backlog = [asyncio.ensure_future(one(i)) for i in range(backlog_size)]
            deadline = time.monotonic() + 30
            while (await newcomer.stats())["requests"] < requests + backlog_size:  # the whole backlog is queued
                failed = [task.exception() for task in backlog if task.done() and task.exception()]
                assert time.monotonic() < deadline and not failed, failed
                await asyncio.sleep(0.005)
            with await newcomer.encode([image()]) as result:
                assert tuple(result.items[0].embeddings.shape) == (64, 128)
            done_before = len(finished)
            await asyncio.wait_for(asyncio.gather(*backlog), 60)
            return done_before, finished

    done_before, finished = asyncio.run(run())
    assert len(finished) == backlog_size
    assert done_before <= backlog_size - 10, f"the newcomer waited for {done_before} of the backlog's requests"


def test_a_client_holding_output_rows_while_others_wait_is_refused_and_the_others_complete(pair):
    """The holder keeps two results (512 of the worker's 1024 output rows, its output_share of
    0.5) without releasing them; while the other client has requests waiting, the holder's next
    request is refused, naming output_share; the other client's requests all complete."""
    big = image(512, 512)  # 256 output rows
    holder = Peer(pair)
    try:
        for request_id in (1, 2):
            holder.send(encode_message(request_id, big), [big])
            assert isinstance(reply_to(holder, request_id), Result)

        async def run() -> None:
            async with AsyncClient(pair) as other:
                async def one(seed: int) -> None:
                    with await other.encode([image(seed=seed)]) as result:
                        assert tuple(result.items[0].embeddings.shape) == (64, 128)

                waiting = [asyncio.ensure_future(one(seed)) for seed in range(20)]
                await asyncio.sleep(0.05)  # all sent: twenty windows' worth of work is queued
                pixels = image(seed=99)
                holder.send(encode_message(3, pixels), [pixels])
                refused = await asyncio.to_thread(reply_to, holder, 3)
                assert isinstance(refused, Error) and refused.code == "overloaded", refused
                assert "output_share" in refused.message, refused
                await asyncio.wait_for(asyncio.gather(*waiting), 30)

        asyncio.run(run())
        holder.send(Release([1, 2]))
        assert barrier(holder) == []
    finally:
        holder.close()


def test_a_request_larger_than_a_clients_share_of_the_queue_is_too_large(peer):
    count = MAIN_QUEUED_ITEMS // 2 + 1
    items = [image(seed=i) for i in range(count)]
    message = Encode(9, [ImageItem(array_ref(pixels, i)) for i, pixels in enumerate(items)])
    peer.send(message, items)
    error = one_error([reply_to(peer, 9)], 9, "too_large", "queue_share", "split")
    assert str(count) in error.message
    works(peer)
