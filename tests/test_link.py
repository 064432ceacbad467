"""The engine-worker link (ipc/link.py): messages whole and in order both ways, whatever their size;
a worker that starts before the engine listens; the end of either side noticed, never waited on."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading

import pytest

from vitserve.ipc.link import MAX_MESSAGE_BYTES, EngineLink, LinkError
from vitserve.ipc.worker_link import WorkerLink


def run(coroutine, timeout_s: float = 30.0):
    async def bounded():
        return await asyncio.wait_for(coroutine, timeout_s)
    return asyncio.run(bounded())


def echo_worker(path: str, count: int) -> threading.Thread:
    """A worker side in a thread: connects (retrying until the engine listens), says hello, then
    sends back each message it gets, `count` of them, and closes."""
    def serve() -> None:
        link = WorkerLink(path, os.getppid())
        link.send(b"hello")
        for _ in range(count):
            assert link.poll(10_000)
            link.send(link.receive())
        link.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


async def receive_all(link: EngineLink, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        got += await link.receive(10.0)
    return got


async def echoed(path: str, messages: list[bytes], listen_after_s: float = 0.0) -> list[bytes]:
    """The engine's side against `echo_worker`: listen (after a while), take the hello, send every
    message at once, and gather what comes back."""
    await asyncio.sleep(listen_after_s)
    link = EngineLink(path)
    try:
        assert await link.receive_one(10.0) == b"hello"
        for message in messages:
            assert link.send_now(message)
        return await receive_all(link, len(messages))
    finally:
        link.close()


def test_a_worker_started_before_the_engine_listens_connects_and_messages_keep_their_order(tmp_path):
    path = str(tmp_path / "worker-0-e0")
    messages = [b"%d" % i * (i % 7 + 1) for i in range(500)] + [b"", bytes(range(256)) * 4]
    worker = echo_worker(path, len(messages))  # tries to connect before there is anything to connect to
    assert run(echoed(path, messages, listen_after_s=0.1)) == messages
    worker.join(10)
    assert not os.path.exists(path)  # close removes the socket file


def test_messages_larger_than_the_socket_buffer_arrive_whole(tmp_path):
    """A send the socket cannot take at once is finished by the loop, before anything sent later."""
    path = str(tmp_path / "link")
    big = [os.urandom(3 << 20), b"after", os.urandom(1 << 20)]
    worker = echo_worker(path, len(big))
    assert run(echoed(path, big)) == big
    worker.join(10)


def test_nothing_is_sent_before_the_worker_connects(tmp_path):
    async def engine() -> tuple[bool, bool]:
        link = EngineLink(str(tmp_path / "link"))
        try:
            before = link.send_now(b"too early")
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(link.path)
            try:
                await asyncio.sleep(0.05)  # the loop takes the connection
                return before, link.send_now(b"now")
            finally:
                peer.close()
        finally:
            link.close()

    assert run(engine()) == (False, True)


def test_the_end_of_the_worker_is_noticed_once_and_sends_fail_after_it(tmp_path):
    async def engine() -> tuple[list, float, bool]:
        link = EngineLink(str(tmp_path / "link"))
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(link.path)
        try:
            peer.sendall(struct.pack("<I", 2) + b"ok" + struct.pack("<I", 9) + b"cut")  # the last one cut short
            got = await link.receive(5.0)
            peer.close()
            ended = await link.receive(5.0)  # the end wakes the receive at once, with nothing
            loop = asyncio.get_running_loop()
            began = loop.time()
            assert await link.receive(0.2) == []  # and only once: later receives wait their time
            waited = loop.time() - began
            with pytest.raises(LinkError):
                await link.send(b"anyone?")
            return got + ended, waited, link.send_now(b"anyone?")
        finally:
            link.close()

    got, waited, sent = run(engine())
    assert got == [b"ok"]
    assert waited >= 0.15
    assert sent is False


def test_interrupt_wakes_a_waiting_receive(tmp_path):
    async def engine() -> float:
        link = EngineLink(str(tmp_path / "link"))
        loop = asyncio.get_running_loop()
        try:
            loop.call_later(0.05, link.interrupt)
            began = loop.time()
            assert await link.receive(30.0) == []
            return loop.time() - began
        finally:
            link.close()

    assert run(engine()) < 5.0


def test_receive_one_times_out_without_a_message(tmp_path):
    async def engine() -> None:
        link = EngineLink(str(tmp_path / "link"))
        try:
            with pytest.raises(TimeoutError):
                await link.receive_one(0.1)
        finally:
            link.close()

    run(engine())


def test_a_corrupt_length_ends_the_link_instead_of_allocating_it(tmp_path):
    async def engine() -> list:
        link = EngineLink(str(tmp_path / "link"))
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(link.path)
        try:
            peer.sendall(struct.pack("<I", MAX_MESSAGE_BYTES + 1) + b"x" * 16)
            got = await link.receive(5.0)
            return [got, link.send_now(b"still there?")]
        finally:
            peer.close()
            link.close()

    assert run(engine()) == [[], False]


def test_the_worker_side_sees_the_engine_close_and_gives_up_on_an_engine_that_is_gone(tmp_path):
    path = str(tmp_path / "link")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    link = WorkerLink(path, os.getppid())
    link.send(b"x")
    engine, _ = listener.accept()
    engine.close()
    assert link.poll(5000)  # the end of the stream counts as something to look at
    with pytest.raises(LinkError):
        link.receive()
    with pytest.raises(LinkError):
        for _ in range(100):  # the first sends may still land in the socket buffer
            link.send(b"y" * 65536)
    link.close()
    listener.close()
    # an engine that never listens, and is not our parent: the connect gives up instead of retrying for ever
    with pytest.raises(LinkError, match="gone"):
        WorkerLink(str(tmp_path / "nobody"), engine_pid=os.getppid() + 1_000_000).send(b"x")
