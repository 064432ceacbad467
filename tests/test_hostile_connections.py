"""Hostile or careless clients against a live `vitserve serve`, on connections: routing ids
claimed ahead of the generated ones or taken over from a client that left, floods of connections
past the descriptor limit, a refused connection's descriptor reused, and connections that never
say hello or come and go. Each test shows that one class of misbehaviour is contained. The engine
stays up (every served process must exit 0 on SIGTERM), other clients keep being served, and what
a client may take (connections, descriptors, routing ids) stays bounded.

The engines are hostile_helpers' `main` and `flood` (started with a soft descriptor limit of 1024,
few connections), started once for this module."""

from __future__ import annotations

import ctypes
import os
import resource
import socket as sockets
import struct
import time

import hostile_helpers
import pytest
import zmq
from hostile_helpers import (
    FLOOD_MAX_CONNECTIONS, Peer, disconnected, encode_message, image, path_of, saw_disconnect, still_serves, stop_watching,
    until_stats, works,
)

from vitserve import Client
from vitserve.ipc.codec import client_codec
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, Cancel, Error, Health, HealthQuery, Hello, Release, Result, Stats, StatsQuery, Welcome,
)

# fixtures, which pytest finds by name here (the engines are module-scoped: this module's own)
main, flood = hostile_helpers.main, hostile_helpers.flood

HELLO_TIMEOUT_S = 10.0  # connections.HELLO_TIMEOUT_S: the server's, not settable from here


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
            stop_watching(newcomer.socket, monitor)
        works(newcomer)
    finally:
        for peer in admitted:
            peer.close()
        for filler in fillers:
            filler.close()
        context.term()


# -- 4. connections that never say hello, or come and go --------------------------------------------

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
        stop_watching(silent.socket, monitor)
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
