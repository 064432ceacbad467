"""A client that reuses a request id in the same burst as the release (or cancel) of the request
that held it. The frontend ends the old request in a later loop turn than the one that reads the
burst; until then its id must stay the old request's, and ending it must never touch a newer
request's record. Otherwise the newer request's result is sent, the client's release of it is
refused as unknown, and its output rows stay leased until the lease times out.

The engine runs in this process on a loop of its own thread, so a test can hold that loop while the
client's messages queue up: they are then read as one burst, deterministically. One test makes that
case exactly; another sends random encodes, releases and cancels over a few ids, in bursts, while
requests run, and checks that every encode gets one reply and that nothing stays held."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import RawPeer

from vitserve import Engine, EngineConfig
from vitserve.engine.frontend import Frontend
from vitserve.ipc.codec import array_ref
from vitserve.ipc.messages import Cancel, Encode, Error, ImageItem, Release, Result, Stats, StatsQuery
from vitserve.scheduler import SchedulerConfig
from vitserve.workers import WindowConfig

HOLD_S = 3.0  # a lone request waits this long in the queue for a fuller window (the max_delay policy)
CONFIG = EngineConfig(window=WindowConfig(min_budget=64, max_budget=256),
                      scheduler=SchedulerConfig(policy="max_delay", max_delay_ms=HOLD_S * 1e3))


@contextlib.contextmanager
def serving_here(config: EngineConfig, path: str):
    """(endpoint, loop): `vitserve serve`'s parts on a loop in a thread of this process."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[Engine, Frontend, asyncio.Task]:
        frontend = Frontend(f"ipc://{path}", config)
        engine = Engine(config)
        await engine.start()
        return engine, frontend, asyncio.ensure_future(frontend.serve(engine))

    engine, frontend, serving = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    try:
        yield frontend.endpoint, loop
    finally:
        async def stop() -> None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await engine.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def served_here(tmp_path_factory):
    """Lone requests wait HOLD_S in the queue (the max_delay policy)."""
    with serving_here(CONFIG, f"{tmp_path_factory.mktemp('sock')}/held.sock") as served:
        yield served


@pytest.fixture(scope="module")
def served_fast(tmp_path_factory):
    """The default policy: a request runs as soon as the worker can take it."""
    config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=256))
    with serving_here(config, f"{tmp_path_factory.mktemp('sock')}/fast.sock") as served:
        yield served


def encode(peer: RawPeer, request_id: int, inline: bool = False) -> list:
    """`inline`: the result's rows come in the reply (as for a remote client), held until released."""
    pixels = np.full((32, 32, 3), request_id % 256, np.uint8)
    return peer.codec.encode(Encode(request_id, [ImageItem(array_ref(pixels, 0))], inline=inline), [pixels])


def as_one_burst(loop: asyncio.AbstractEventLoop, peer: RawPeer, messages: list[list], hold_s: float = 0.3) -> None:
    """Send `messages` while the engine's loop is held, so that its next read takes them all."""
    held = threading.Event()

    def hold() -> None:
        held.set()
        time.sleep(hold_s)

    loop.call_soon_threadsafe(hold)
    assert held.wait(10)
    for frames in messages:
        peer.socket.send_multipart(frames, copy=False)


def replies_until(peer: RawPeer, done) -> list:
    """Replies as they come, results released at once, until `done(replies)`."""
    replies = []
    while not done(replies):
        message, _ = peer.receive()
        replies.append(message)
        if isinstance(message, Result):
            peer.socket.send_multipart(peer.codec.encode(Release([message.id])))
    return replies


def barrier(peer: RawPeer, replies: list) -> dict:
    """A stats query's answer; the replies that came before it go to `replies`."""
    peer.socket.send_multipart(peer.codec.encode(StatsQuery()))
    got = replies_until(peer, lambda got: got and isinstance(got[-1], Stats))
    replies += got[:-1]
    return got[-1].values


def nothing_left(peer: RawPeer, replies: list | None = None) -> dict:
    """The engine's counts once every request of the peer has ended and been released, every
    window has come back (a cancelled request's may still run) and every reply has gone out; the
    replies read on the way go to `replies`."""
    replies = [] if replies is None else replies
    deadline = time.monotonic() + 2 * HOLD_S + 30
    while time.monotonic() < deadline:
        stats = barrier(peer, replies)
        if stats["requests_open"] == 0 and stats["windows_in_flight"] == 0:
            barrier(peer, replies)  # (an error decided in the turn that answered goes out in the next)
            return stats
        time.sleep(0.1)
    raise AssertionError(f"a request or a window is still open: {stats}")


def ends_of(replies: list, request_id: int) -> list[str]:
    return [reply.code if isinstance(reply, Error) else "result" for reply in replies
            if isinstance(reply, (Error, Result)) and reply.id == request_id]


@pytest.mark.parametrize("end_with", ["release", "cancel"])
def test_an_id_reused_in_the_burst_that_ends_its_request_is_still_in_use(served_here, end_with):
    endpoint, loop = served_here
    peer = RawPeer(endpoint)
    try:
        assert peer.ask(encode(peer, 7)) == []  # queued, held for a fuller window
        end = Release([7]) if end_with == "release" else Cancel(7)
        as_one_burst(loop, peer, [peer.codec.encode(end), encode(peer, 7)])
        replies = replies_until(peer, lambda replies: len(ends_of(replies, 7)) == 2)
        assert sorted(ends_of(replies, 7)) == ["cancelled", "invalid_input"], replies
        assert "already in use" in next(r.message for r in replies if isinstance(r, Error) and r.code == "invalid_input")
        stats = nothing_left(peer)
        assert stats["slots_leased"] == 0 and stats["queued_items"] == 0, stats

        peer.socket.send_multipart(encode(peer, 7))  # the id is free again
        assert ends_of(replies_until(peer, lambda replies: ends_of(replies, 7)), 7) == ["result"]
        assert nothing_left(peer)["slots_leased"] == 0
    finally:
        peer.close()


_messages = st.tuples(st.sampled_from(["encode", "encode", "inline", "release", "cancel"]), st.integers(0, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bursts=st.lists(st.tuples(st.lists(_messages, min_size=1, max_size=5), st.booleans()), min_size=1, max_size=6))
def test_every_encode_ends_once_and_nothing_stays_held_whatever_the_ids(served_fast, bursts):
    """Encodes (some inline), releases and cancels over four ids, sent in bursts (some held: read as
    one burst) while requests run; results are released as they come. Every encode gets exactly one reply (a
    refusal, a result or an error), and once all is done the engine holds nothing."""
    endpoint, loop = served_fast
    peer = RawPeer(endpoint)
    encodes, replies = 0, []
    try:
        for burst, held in bursts:
            messages = [encode(peer, request_id, kind == "inline") if kind in ("encode", "inline") else
                        peer.codec.encode(Release([request_id]) if kind == "release" else Cancel(request_id))
                        for kind, request_id in burst]
            encodes += sum(kind in ("encode", "inline") for kind, _ in burst)
            if held:
                as_one_burst(loop, peer, messages, hold_s=0.05)
            else:
                for frames in messages:
                    peer.socket.send_multipart(frames, copy=False)
        stats = nothing_left(peer, replies)
    finally:
        peer.close()
    ends = [r for r in replies if isinstance(r, Result) or (isinstance(r, Error) and "holds nothing" not in r.message)]
    assert len(ends) == encodes, (encodes, replies)
    assert stats["slots_leased"] == 0 and stats["queued_items"] == 0, stats
