"""The engine's link to one worker process: a Unix stream socket carrying messages, each a msgpack
header prefixed by its length.

Engine and worker exchange only small headers (pixels and embeddings stay in shared memory), and
every request waits for two of them: the window going out, its completion coming back. ZeroMQ's
ipc:// passes each message through an I/O thread on both sides, thread hand-offs that cost more
than the message: a round trip with the engine's asyncio loop on one end took 116 µs through a
ZeroMQ PAIR socket and 32 µs through this link (2-core CI machine).

The engine listens (`EngineLink`, asyncio, never blocking) and the worker connects (`WorkerLink`,
blocking: worker_link.py). A worker may start before the engine listens (`vitserve serve` spawns its GPU workers
first) and keeps trying. One peer per link; the end of the stream is the end of the peer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections import deque

LENGTH = struct.Struct("<I")  # each message's byte count, before it
MAX_MESSAGE_BYTES = 64 << 20  # far above any header; a larger length means a corrupt stream
RECEIVE_BYTES = 1 << 20  # read at most this much per call


class LinkError(ConnectionError):
    pass


def split_messages(buffer: bytearray, messages: deque) -> None:
    """Move the complete messages at the front of `buffer` into `messages`."""
    start = 0
    while len(buffer) - start >= LENGTH.size:
        (size,) = LENGTH.unpack_from(buffer, start)
        if size > MAX_MESSAGE_BYTES:
            raise LinkError(f"a message of {size} bytes on a worker link: the stream is corrupt")
        end = start + LENGTH.size + size
        if end > len(buffer):
            break
        messages.append(bytes(buffer[start + LENGTH.size:end]))
        start = end
    del buffer[:start]


class EngineLink:
    """The engine's end: listens on `path` (created here; the directory is the engine's own)."""

    def __init__(self, path: str):
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.setblocking(False)
        self._listener.bind(path)
        self._listener.listen(1)
        self._peer: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = bytearray()
        self._messages: deque[bytes] = deque()
        self._outbox = bytearray()  # what the socket did not take yet (a full buffer), sent when it can
        self._waiter: asyncio.Future | None = None
        self._ended = False  # the peer closed its end (or the stream broke)
        self._interrupted = False
        self._listening = self._reading = False  # the loop watches the listener, the peer

    # -- connection ------------------------------------------------------------------------------
    def _connected(self) -> bool:
        """Whether the worker has connected, taking its connection now if it is waiting."""
        if self._peer is None and self._listener is not None:
            try:
                peer, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                self._watch()
                return False
            if self._listening:
                self._loop.remove_reader(self._listener.fileno())
                self._listening = False
            self._listener.close()  # one peer: nobody else may take its place
            self._listener = None
            peer.setblocking(False)
            self._peer = peer
        self._watch()
        return self._peer is not None

    def _watch(self) -> None:
        """Have the running loop take the connection, and then read the peer, as soon as they come."""
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # (not in the loop yet: the next call from it watches)
        if self._listener is not None and not self._listening:
            self._loop.add_reader(self._listener.fileno(), self._on_connection)
            self._listening = True
        if self._peer is not None and not self._reading and not self._ended:
            self._loop.add_reader(self._peer.fileno(), self._on_readable)
            self._reading = True

    def _on_connection(self) -> None:
        if self._connected():
            self._wake()

    # -- receiving -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self._peer.recv(RECEIVE_BYTES)  # (more waiting: the loop calls again)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by a dying peer
            data = b""
        if data:
            self._buffer += data
            try:
                split_messages(self._buffer, self._messages)
            except LinkError:
                self._end()
        else:
            self._end()
        self._wake()

    def _end(self) -> None:
        self._ended = True
        if self._loop is not None and self._peer is not None and not self._loop.is_closed():
            if self._reading:
                self._loop.remove_reader(self._peer.fileno())
            if self._outbox:
                self._loop.remove_writer(self._peer.fileno())
        self._reading = False
        self._outbox.clear()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, deadline: float | None) -> None:
        """Until something happens (a message, the peer's end, an interrupt) or `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        self._connected()
        self._waiter = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, self._wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def receive(self, timeout_s: float | None = None) -> list[bytes]:
        """The messages that have arrived: at least one, or none once `timeout_s` has passed, after
        an `interrupt`, or once when the peer's end is found (its caller checks on the process)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self._messages:
                burst = list(self._messages)
                self._messages.clear()
                return burst
            if self._interrupted or (deadline is not None and loop.time() >= deadline):
                self._interrupted = False
                return []
            ended = self._ended
            await self._wait(deadline)
            if self._ended and not ended:
                return []

    async def receive_one(self, timeout_s: float) -> bytes:
        """One message (for handshakes); raises TimeoutError when none arrives in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._messages:
            if loop.time() >= deadline:
                raise TimeoutError(f"no message from the worker within {timeout_s:g} s")
            await self._wait(deadline)
        return self._messages.popleft()

    def interrupt(self) -> None:
        """Have a `receive` waiting now (or the next one) return at once with what has arrived: its
        caller has something else to look at (e.g. the peer's process ended)."""
        self._interrupted = True
        self._wake()

    # -- sending ---------------------------------------------------------------------------------
    def send_now(self, message: bytes) -> bool:
        """Send (what the socket cannot take now goes out as soon as it can, in order); False when
        no worker has connected yet or its end is gone."""
        if self._ended or not self._connected():
            return False
        data = LENGTH.pack(len(message)) + message
        if self._outbox:  # behind what waits already
            self._outbox += data
            return True
        try:
            sent = self._peer.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # EPIPE, ECONNRESET: the worker is gone
            self._end()
            return False
        if sent < len(data):
            self._outbox += data[sent:]
            if self._loop is None:
                raise LinkError("a partial send outside the event loop")  # (never: messages are small)
            self._loop.add_writer(self._peer.fileno(), self._flush)
        return True

    def _flush(self) -> None:
        try:
            sent = self._peer.send(self._outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end()
            return
        del self._outbox[:sent]
        if not self._outbox:
            self._loop.remove_writer(self._peer.fileno())

    async def send(self, message: bytes, poll_s: float = 0.01) -> None:
        """Send once the worker has connected; LinkError when its end is gone."""
        while not self.send_now(message):
            if self._ended:
                raise LinkError("the worker's end of the link is closed")
            await asyncio.sleep(poll_s)

    def close(self) -> None:
        self._end()
        if self._listening and not self._loop.is_closed():
            self._loop.remove_reader(self._listener.fileno())
        self._listening = False
        for sock in (self._listener, self._peer):
            if sock is not None:
                sock.close()
        self._listener = self._peer = None
        self._ended = True
        self._wake()
        try:
            os.unlink(self.path)
        except OSError:
            pass
