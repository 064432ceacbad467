"""A client that stops reading: once its queue of unread replies is full, the engine drops
further replies instead of buffering without bound, counts each one (`replies_dropped`), and
frees the rows of a dropped result at once instead of holding them until lease_timeout_s. The
client's connection stays usable, and every message it sent is accounted for exactly once."""

from __future__ import annotations

import time

import numpy as np
from served import RawPeer, served

from vitserve import Client
from vitserve.ipc.codec import array_ref
from vitserve.ipc.messages import Encode, Error, ImageItem, Release, Stats, StatsQuery

QUERIES = 6000  # far more than the engine's 1000 unread replies plus the socket buffers hold


def until_stats(client: Client, condition, what: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not condition(stats := client.stats()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.05)
    return stats


def test_replies_to_a_client_that_stops_reading_are_dropped_counted_and_results_freed(tmp_path):
    endpoint = f"ipc://{tmp_path}/unread.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "512", "--lease-timeout-s", "300"):
        with Client(endpoint) as observer:
            stalled = RawPeer(endpoint, receive_hwm=1)
            query = stalled.codec.encode(StatsQuery())
            for _ in range(QUERIES):
                stalled.socket.send_multipart(query)
            until_stats(observer, lambda s: s["replies_dropped"] > 0, "replies to be dropped")
            pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            stalled.socket.send_multipart(stalled.codec.encode(Encode(7, [ImageItem(array_ref(pixels, 0))]), [pixels]))
            stats = until_stats(observer, lambda s: s["results"] == 1 and s["requests_open"] == 0,
                                "the undeliverable result to be freed")
            assert stats["slots_leased"] == 0  # long before the 300 s lease timeout
            dropped = stats["replies_dropped"]

            received = []
            while stalled.socket.poll(1000):
                received.append(stalled.receive()[0])
            assert all(isinstance(message, Stats) for message in received)  # the result was among the dropped
            assert len(received) + dropped == QUERIES + 1  # each message: one reply, or one drop counted

            replies = stalled.ask(stalled.codec.encode(Release([7])))  # the connection still works
            assert len(replies) == 1 and isinstance(replies[0][0], Error) and replies[0][0].code == "invalid_input"
            stalled.close()
