"""The direct link: an ipc:// client's messages over a Unix stream socket beside the endpoint
(`<endpoint path>.link`, the endpoint's permissions), with no ZeroMQ between the two processes.

ZeroMQ carries every message through an I/O thread on each side: a request and its reply cost
four thread hand-offs, and after a few milliseconds of waiting each one wakes a sleeping thread
(tens to hundreds of microseconds on a virtual machine). Over the direct link the sender's own
thread writes the message into the socket and the receiver's event loop reads it: one wake-up
per message, none at all when the receiver is polling (busy_poll.py). The messages are the same
(ipc/codec.py's frames); `vitserve serve` offers the link beside its ipc:// endpoint unless it
authenticates clients by CURVE key, and a client that cannot reach it talks ZeroMQ as before.

A message is a prefix, then its frames' bytes in order: the frame count (u32) and each frame's
length (u64), little-endian. The reader checks the count and the lengths against its bounds before
it buffers a byte of the frames, so a hostile length costs nothing but the connection.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections import deque
from typing import Callable, Sequence

from .endpoints import LINK_SUFFIX

COUNT = struct.Struct("<I")
LENGTH = struct.Struct("<Q")
RECEIVE_BYTES = 1 << 20  # read at most this much per wake-up: a flooding peer cannot hold the loop
MAX_IOVECS = 512  # buffers per sendmsg (the kernel takes at most IOV_MAX, 1024)


class LinkBroken(ConnectionError):
    """The stream broke its own rules (a count or a length past the bounds): the connection goes."""


def link_path(endpoint_path: str) -> str:
    return endpoint_path + LINK_SUFFIX


def message_buffers(frames: Sequence) -> list:
    """What goes on the stream for one message: its prefix, then its frames as they are (no copy)."""
    views = [memoryview(frame).cast("B") for frame in frames]
    prefix = COUNT.pack(len(views)) + b"".join(LENGTH.pack(view.nbytes) for view in views)
    return [prefix, *views]


class FrameSplitter:
    """Bytes from the stream in, whole messages (lists of frames, as memoryviews) out."""

    def __init__(self, max_frames: int, max_first_bytes: int, max_message_bytes: int):
        self._max_frames, self._max_first, self._max_total = max_frames, max_first_bytes, max_message_bytes
        self._buffer = bytearray()
        self._lengths: list[int] | None = None  # the lengths of the message being read, once its prefix is
        self._total = 0  # and their sum

    def feed(self, data: bytes, messages: list) -> None:
        """Append `data`; every message now complete goes into `messages`. LinkBroken past the bounds."""
        self._buffer += data
        start = 0
        buffer = self._buffer
        while True:
            if self._lengths is None:
                if len(buffer) - start < COUNT.size:
                    break
                (count,) = COUNT.unpack_from(buffer, start)
                if not 1 <= count <= self._max_frames:
                    raise LinkBroken(f"a message of {count} frames (1 to {self._max_frames} allowed)")
                prefix = COUNT.size + count * LENGTH.size
                if len(buffer) - start < prefix:
                    break
                lengths = [LENGTH.unpack_from(buffer, start + COUNT.size + i * LENGTH.size)[0] for i in range(count)]
                total = sum(lengths)
                if lengths[0] > self._max_first or total > self._max_total:
                    raise LinkBroken(f"a message of {total} bytes, header {lengths[0]} (at most "
                                     f"{self._max_total} and {self._max_first})")
                self._lengths, self._total = lengths, total
                start += prefix
            end = start + self._total
            if len(buffer) < end:
                break
            whole = bytes(buffer[start:end])  # the message's own memory: its frames outlive the buffer
            view, offsets = memoryview(whole), itertools.accumulate(self._lengths, initial=0)
            first = next(offsets)
            frames = []
            for last in offsets:
                frames.append(view[first:last])
                first = last
            messages.append(frames)
            self._lengths = None
            start = end
        del buffer[:start]


class DirectStream:
    """One end of a direct link in an asyncio loop: reads whole messages as they come (`on_messages`),
    writes messages at once or, when the socket is full, as soon as it has room, and reports its end
    once (`on_closed(reason, broken)`; broken: the peer broke the stream's bounds). Sending never
    blocks: past `max_unsent` messages waiting for room, a send is refused (the peer is not reading)."""

    def __init__(self, sock: socket.socket, splitter: FrameSplitter, on_messages: Callable[[list], None],
                 on_closed: Callable[[str, bool], None], max_unsent: int):
        self.socket = sock
        self.fd = sock.fileno()
        self._splitter, self._on_messages, self._on_closed = splitter, on_messages, on_closed
        self._max_unsent = max_unsent
        self._outbox: deque[memoryview | bytes] = deque()
        self._unsent = 0  # messages given to send since the outbox was last empty
        self._loop = asyncio.get_running_loop()
        self._writing = False  # the loop watches for room to write the outbox
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(self.fd, self._on_readable)

    def send_now(self, frames: Sequence) -> bool:
        """Send one message (what the socket cannot take now goes out when it can, in order); False
        when the stream is closed or `max_unsent` messages already wait."""
        if self.closed or self._unsent >= self._max_unsent:
            return False
        waiting = bool(self._outbox)
        self._outbox.extend(message_buffers(frames))
        self._unsent += 1
        if not waiting:
            self._flush()
        return not self.closed

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                sent = self.socket.sendmsg(list(itertools.islice(outbox, MAX_IOVECS)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # EPIPE, ECONNRESET: the peer is gone
                self.close(f"the peer is gone ({error.strerror})")
                return
            while sent:
                head = outbox[0]
                if len(head) > sent:
                    outbox[0] = memoryview(head)[sent:]
                    break
                sent -= len(head)
                outbox.popleft()
            else:
                continue
            break  # the socket took part of a buffer: it is full
        if outbox and not self._writing:
            self._loop.add_writer(self.fd, self._flush)
        elif not outbox:
            self._unsent = 0
            if self._writing:
                self._loop.remove_writer(self.fd)
        self._writing = bool(outbox)

    def _on_readable(self) -> None:
        try:
            data = self.socket.recv(RECEIVE_BYTES)  # (more waiting: the loop calls again)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(f"the stream broke ({error.strerror})")
            return
        if not data:
            self.close("the peer closed its end")
            return
        messages: list = []
        try:
            self._splitter.feed(data, messages)
        except LinkBroken as error:
            if messages:  # the messages before the broken one still count
                self._on_messages(messages)
            self.close(str(error), broken=True)
            return
        if messages:
            self._on_messages(messages)

    def close(self, reason: str = "closed", broken: bool = False) -> None:
        """Close (idempotent); `on_closed(reason, broken)` is called once, here."""
        if self.closed:
            return
        self.closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
        self._outbox.clear()
        self.socket.close()
        self._on_closed(reason, broken)
