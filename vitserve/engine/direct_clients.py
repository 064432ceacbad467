"""The engine's side of the direct link (ipc/direct.py): local clients' connections on the Unix
socket beside the ipc:// endpoint, each one a `Connection` like those of the ZeroMQ socket, with the
same limits (connections.py), the same hello and the same handling of every message.

A connection's messages are handled as its bytes arrive, in the event loop's callback, and the
windows they make go out at once (`Engine.dispatch_now`). Its end, whether the client closed it,
died, or was shut by the frontend, ends its requests and frees what it held, as a ZeroMQ disconnect
does. A local peer that dies always closes its socket (the kernel does), so unlike tcp:// no
heartbeat is needed to find it; the client pings to find a stopped engine.
"""

from __future__ import annotations

import asyncio
import logging
import socket as sockets
from typing import Callable

from vitserve.ipc.direct import DirectStream, FrameSplitter, link_path
from vitserve.ipc.endpoints import bind_unix_socket
from vitserve.log_limits import LogLimiter

from .connections import Connection, Connections

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKE = 64  # connections taken per wake-up of the listener: a flood of them cannot hold the loop
ACCEPT_PAUSE_S = 0.1  # out of descriptors: accepting waits this long instead of spinning
BACKLOG = 128


class DirectClients:
    """Listens beside the endpoint; `on_message(connection, frames)` for each message, `on_burst()`
    after each read's messages, `on_closed(connection)` once for each connection that ends."""

    def __init__(self, endpoint_path: str, mode: int, connections: Connections, max_frames: int,
                 max_header_bytes: int, max_message_bytes: int, max_unsent: int):
        self.path = link_path(endpoint_path)
        self._listener, self._bound = bind_unix_socket(self.path, mode, sockets.SOCK_STREAM, BACKLOG)
        self._listener.setblocking(False)
        self._connections = connections
        self._bounds = (max_frames, max_header_bytes, max_message_bytes)
        self._max_unsent = max_unsent
        self._log_limits = LogLimiter(log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: tuple[Callable, Callable, Callable] | None = None

    def start(self, on_message: Callable[[Connection, list], None], on_burst: Callable[[], None],
              on_closed: Callable[[Connection], None]) -> None:
        """Accept connections from now on (in the running loop)."""
        self._handlers = (on_message, on_burst, on_closed)
        self._loop = asyncio.get_running_loop()
        self._listen()

    def _listen(self) -> None:
        if self._handlers is not None:  # (not closed meanwhile)
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of descriptors: the connection waits in the backlog
                self._log_limits.warning("accept", "direct link: accept failed: %s", error)
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(ACCEPT_PAUSE_S, self._listen)
                return
            connection = self._connections.opened(sock.fileno(), direct=True)
            connection.stream = DirectStream(sock, FrameSplitter(*self._bounds),
                                             lambda messages, c=connection: self._received(c, messages),
                                             lambda reason, broken, c=connection: self._closed(c, reason, broken),
                                             self._max_unsent)
            self._connections.shed_if_over(connection)

    def _received(self, connection: Connection, messages: list) -> None:
        on_message, on_burst, _ = self._handlers
        for frames in messages:
            if connection.closed:
                break  # shut by one of the messages before
            on_message(connection, frames)
        on_burst()

    def _closed(self, connection: Connection, reason: str, broken: bool) -> None:
        if broken:
            self._log_limits.warning("bounds", "direct link: %s: shutting its connection", reason)
        if self._connections.forget(connection) and self._handlers is not None:
            self._handlers[2](connection)

    def close(self) -> None:
        """Stop listening, remove the socket file (if still ours) and close every connection. Safe to
        call more than once."""
        if self._loop is not None and not self._loop.is_closed() and self._listener.fileno() >= 0:
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._bound.release()
        self._handlers = None  # the engine is stopping: what the connections held goes with it
        for connection in self._connections.direct_ones():
            connection.stream.close("the engine stopped")
