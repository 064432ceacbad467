"""The client's end of the direct link (ipc/direct.py), and of ZeroMQ's socket, behind one face.

`AsyncClient` talks to its engine through a transport: send a message (now, or once there is
room), receive what has arrived, and learn of the connection's events (connected, lost). Over
ZeroMQ those are a DEALER socket and its monitor; over the direct link, a Unix stream socket that
this end reconnects by itself (every RECONNECT_S, as ZeroMQ does) and keeps checked by pinging an
engine it has not heard from for a heartbeat: three beats of silence lose the connection, as
ZMTP heartbeats do for a ZeroMQ one.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from typing import Any, Sequence

import zmq

from vitserve.ipc.burst import BurstSocket
from vitserve.ipc.direct import DirectStream, FrameSplitter
from vitserve.ipc.messages import MAX_ITEMS_PER_REQUEST

CONNECTED, DISCONNECTED = int(zmq.EVENT_CONNECTED), int(zmq.EVENT_DISCONNECTED)
RECONNECT_S = 0.1  # ZeroMQ's default reconnect interval
MAX_UNSENT = 100_000  # messages waiting for room before a send waits too (the engine reads what comes)
# What the engine may send: a header (a result's references) and one frame per item; the sizes only
# catch a corrupt stream (the engine is trusted, unlike its clients).
MAX_FRAMES, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES = MAX_ITEMS_PER_REQUEST + 1, 1 << 30, 1 << 42


class ZmqTransport:
    """A DEALER socket (BurstSocket) and its monitor's connection events."""

    def __init__(self, socket: zmq.Socket, events: int):
        self._socket = socket
        self._burst = BurstSocket(socket)
        self._monitor = BurstSocket(socket.get_monitor_socket(events))
        self.send, self.send_now = self._burst.send, self._burst.send_now
        self.receive, self.receive_one, self.take = self._burst.receive, self._burst.receive_one, self._burst.take

    @property
    def closed(self) -> bool:
        return self._socket.closed

    async def events(self, timeout_s: float | None = None) -> list[int]:
        """The connection's events since the last call: at least one, or none after `timeout_s`."""
        return [struct.unpack("=H", bytes(frames[0])[:2])[0] for frames in await self._monitor.receive(timeout_s)]

    def close(self) -> None:
        # Events stopped before their reader closes: libzmq's I/O thread would block for ever sending
        # one (a disconnect) to a PAIR without its reader, holding the lock that disabling takes
        self._socket.disable_monitor()
        self.close_events()
        self._burst.close()

    def close_events(self) -> None:
        self._monitor.close()


class DirectTransport:
    """The direct link to an engine listening at `path`; `ping` is the encoded Ping to beat with.
    Made in a running loop; ConnectionRefusedError (or another OSError) when nothing listens there."""

    def __init__(self, path: str, ping: list, heartbeat_s: float):
        self._path, self._ping, self._beat = path, ping, heartbeat_s
        self._loop = asyncio.get_running_loop()
        self._stream: DirectStream | None = None
        self._messages: deque[list] = deque()
        self._events: list[int] = []
        # receives' and events' waits, apart: a message wakes only what waits for messages
        self._message_waiters: list[asyncio.Future] = []
        self._event_waiters: list[asyncio.Future] = []
        self._heard = self._loop.time()  # when the engine's bytes last came
        self._reconnect: asyncio.TimerHandle | None = None
        self.closed = False
        self._connect(first=True)

    def _connect(self, first: bool = False) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self._path)
        except OSError:
            sock.close()
            if first:
                raise
            self._reconnect = self._loop.call_later(RECONNECT_S, self._connect)
            return
        self._reconnect = None
        self._stream = DirectStream(sock, FrameSplitter(MAX_FRAMES, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES),
                                    self._arrived, self._lost, MAX_UNSENT)
        self._heard = self._loop.time()
        self._event(CONNECTED)

    def _arrived(self, messages: list) -> None:
        self._heard = self._loop.time()
        self._messages.extend(messages)
        self._wake(self._message_waiters)

    def _lost(self, reason: str, broken: bool) -> None:
        self._stream = None
        if not self.closed:
            self._event(DISCONNECTED)
            self._reconnect = self._loop.call_later(RECONNECT_S, self._connect)

    def _event(self, event: int) -> None:
        self._events.append(event)
        self._wake(self._event_waiters)

    @staticmethod
    def _wake(waiters: list[asyncio.Future]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _until(self, condition, waiters: list[asyncio.Future], timeout_s: float | None) -> None:
        """Until `condition()` holds (checked whenever `waiters` are woken), the transport is closed,
        or `timeout_s` has passed."""
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        while not condition() and not self.closed:
            left = None if deadline is None else deadline - self._loop.time()
            if left is not None and left <= 0:
                return
            waiter = self._loop.create_future()
            waiters.append(waiter)
            timer = None if left is None else self._loop.call_later(left, self._wake, [waiter])
            try:
                await waiter
            finally:
                waiters.remove(waiter)
                if timer is not None:
                    timer.cancel()

    # -- sending ---------------------------------------------------------------------------------
    def send_now(self, frames: Sequence[Any]) -> bool:
        """Send at once; False only when MAX_UNSENT messages wait for room. With no connection the
        message is dropped: its connection was lost, which fails what waited on it."""
        stream = self._stream
        return stream is None or stream.send_now(frames) or stream.closed

    async def send(self, frames: Sequence[Any]) -> None:
        while not self.send_now(frames):
            await asyncio.sleep(RECONNECT_S / 10)  # (only while the engine reads nothing at all)

    # -- receiving -------------------------------------------------------------------------------
    def take(self) -> list[list]:
        burst = list(self._messages)
        self._messages.clear()
        return burst

    async def receive(self, timeout_s: float | None = None) -> list[list]:
        """The messages that have arrived: at least one, or none once `timeout_s` has passed. Messages
        already waiting are taken after a loop turn, so that a busy engine cannot starve the loop."""
        if self._messages:
            await asyncio.sleep(0)
        else:
            await self._until(lambda: self._messages, self._message_waiters, timeout_s)
        return self.take()

    async def receive_one(self, timeout_s: float | None = None) -> list:
        async def one() -> list:
            await self._until(lambda: self._messages, self._message_waiters, None)
            if not self._messages:
                raise ConnectionError("the client was closed")
            return self._messages.popleft()

        return await asyncio.wait_for(one(), timeout_s)

    async def events(self, timeout_s: float | None = None) -> list[int]:
        """The connection's events since the last call: at least one, or none after `timeout_s`; and
        the heartbeat: a ping after a beat of silence, the connection lost after three."""
        await self._until(lambda: self._events, self._event_waiters, timeout_s)
        stream = self._stream
        if stream is not None:
            silent = self._loop.time() - self._heard
            if silent >= 3 * self._beat:
                stream.close(f"the engine was silent for {silent:.1f} s")
            elif silent >= self._beat:
                stream.send_now(self._ping)
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self.closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._stream is not None:
            self._stream.close("the client closed")
        self._wake(self._message_waiters)
        self._wake(self._event_waiters)
