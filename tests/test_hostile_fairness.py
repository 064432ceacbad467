"""Hostile or careless clients against a live `vitserve serve`, on sharing the engine: the
connection limit, priorities out of range, a client's backlog against another client's single
request, a client flooding cheap queries, a client holding output rows while others wait, and a
request past a client's share of the queue. Each test shows that one class of misbehaviour is
contained. The engine stays up (every served process must exit 0 on SIGTERM), other clients keep
being served, and what a client may take (connections, queue, output rows) stays bounded.

The engines are hostile_helpers' `main` and `pair` (two connections at most, little output
memory), started once for this module."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import hostile_helpers
import pytest
from hostile_helpers import (
    MAIN_QUEUED_ITEMS, Peer, barrier, encode_message, image, one_error, reply_to, still_serves, works,
)

from vitserve import AsyncClient, Client
from vitserve.ipc.codec import array_ref
from vitserve.ipc.messages import Encode, Error, HealthQuery, ImageItem, Release, Result

# fixtures, which pytest finds by name here (the engines are module-scoped: this module's own)
main, pair, peer = hostile_helpers.main, hostile_helpers.pair, hostile_helpers.peer


# -- 1. the connection limit ------------------------------------------------------------------------

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


# -- 2. fairness ------------------------------------------------------------------------------------

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


FLOOD_LIMIT_S = 60.0  # the flooder stops by itself after this long: a starved engine serves only then


def flood_queries(endpoint: str, flooding, stop, sent) -> None:
    """Health queries as fast as one process can send them, replies read only when they are there."""
    peer = Peer(endpoint)
    frames = peer.codec.encode(HealthQuery())
    try:
        flooding.set()
        end = time.monotonic() + FLOOD_LIMIT_S
        while not stop.is_set() and time.monotonic() < end:
            for _ in range(100):
                peer.socket.send_multipart(frames)
                while peer.socket.poll(0):
                    peer.socket.recv_multipart()
            sent.value += 100
    finally:
        peer.close()


def test_a_client_flooding_queries_does_not_stall_another_clients_requests(main):
    """The frontend reads whatever has arrived, burst after burst: with a client that keeps its
    socket full, an await that never suspends would give the engine's loop no turn for workers'
    replies, and other clients' results would wait until the flood ends."""
    endpoint, _ = main
    context = multiprocessing.get_context("spawn")
    flooding, stop, sent = context.Event(), context.Event(), context.Value("q", 0)
    flooder = context.Process(target=flood_queries, args=(endpoint, flooding, stop, sent), daemon=True)
    flooder.start()
    try:
        assert flooding.wait(60), "the flooder did not start"
        while sent.value < 20_000:  # the flood is on
            assert flooder.is_alive()
            time.sleep(0.01)
        with Client(endpoint) as client:
            for seed in range(3):
                with client.encode([image(seed=seed)]) as result:
                    assert tuple(result.items[0].embeddings.shape) == (64, 128)
        assert flooder.is_alive() and not stop.is_set(), "the flood ended before the requests did"
    finally:
        stop.set()
        flooder.join(10)
        if flooder.is_alive():
            flooder.kill()
    still_serves(endpoint)


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
