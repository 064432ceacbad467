"""Hostile or careless clients against a live `vitserve serve`, on bounds: messages past the
protocol's bounds (ids to release, items in an encode, frames), releases of unknown ids, requests
before hello, unfinished inputs and unreleased inline results past a client's bytes, and floods of
undecodable messages against the log. Each test shows that one class of misbehaviour is contained.
The engine stays up (every served process must exit 0 on SIGTERM), other clients keep being
served, and what a client may take (memory, replies, log lines) stays bounded.

The engines are hostile_helpers' `main` and `flood` (few connections, small byte bounds), started
once for this module."""

from __future__ import annotations

import os
import struct
import time

import hostile_helpers
import msgspec
from hostile_helpers import (
    Peer, barrier, disconnected, encode_message, image, one_error, reply_to, saw_disconnect, stop_watching, until_stats,
    works,
)

from vitserve.ipc.messages import ArrayRef, Error, Health, HealthQuery, ImageItem, Release, Result, StatsQuery

try:
    from vitserve.ipc.messages import MAX_ITEMS_PER_REQUEST, MAX_RELEASE_IDS
except ImportError:  # an engine from before the protocol bounded its element counts
    MAX_ITEMS_PER_REQUEST = MAX_RELEASE_IDS = 4096

# fixtures, which pytest finds by name here (the engines are module-scoped: this module's own)
main, flood, peer = hostile_helpers.main, hostile_helpers.flood, hostile_helpers.peer


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


# -- 1. per-message bounds, and hello first ---------------------------------------------------------

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
        stop_watching(hostile.socket, monitor)
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


# -- 2. what a client may hold ----------------------------------------------------------------------

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


# -- 3. log lines -----------------------------------------------------------------------------------

def test_a_flood_of_undecodable_messages_costs_a_few_log_lines(main):
    endpoint, process = main
    new_stderr(process)  # what earlier tests made it log
    hostile = Peer(endpoint)
    try:
        # 2000 messages in bursts the reply pipe holds (its high-water mark is 1000): a burst past it
        # would have its replies dropped, the stats reply that ends the burst among them.
        for _ in range(4):
            for _ in range(500):
                hostile.socket.send_multipart([b"\xc1\xff"])
            assert len(barrier(hostile)) == 500  # each garbage message was answered with an error
        works(hostile)
    finally:
        hostile.close()
    lines = new_stderr(process).splitlines()
    assert len(lines) <= 5, "\n".join(lines[:20])
