"""Client connections as the frontend knows them: one record per accepted connection, never
per routing id.

ZeroMQ's ROUTER names each peer by a routing id that the peer may choose itself, so a routing
id proves nothing: once a client's connection drops, the next peer to claim its id would
receive its replies. Here the frontend watches the socket's own connection events (a monitor:
accepted and disconnected, each with the connection's descriptor), and every message carries
the descriptor it arrived on (ZMQ_SRCFD). A connection is bound to the routing id of its first
message, and everything a client asks for belongs to that record. When the connection closes
(its process exited, it closed, or we shut it), its requests end and the record goes; a peer
that later claims the same routing id is a new connection that reaches nothing of the old one.

Local clients may connect over the direct link instead (direct_clients.py): those connections are
kept apart from the socket's (`direct`), by serial, since libzmq reports a descriptor's close only
after it closed it, when the descriptor may already be a direct connection's.

Bounds. Each connection holds a descriptor. Connections past `max_connections` are shut down
as soon as their accept is seen (the socket is shut down under libzmq, which then closes it as
if the peer had left), and so are connections that do not say hello within HELLO_TIMEOUT_S.
libzmq aborts the process when an ipc:// accept finds no descriptor left, so the soft limit is
raised to the hard one at start-up.

Routing ids libzmq generates for peers that choose none are a counter whose start comes from
the C library's rand(), never seeded: predictable, and a peer that takes an id the counter
reaches later makes libzmq abort at that connection. The seed is set from the OS's random
source before the socket is made, and our clients always choose a random 16-byte id.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import resource
import socket as sockets
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import zmq

from vitserve.ipc.burst import POLLIN
from vitserve.log_limits import LogLimiter

if TYPE_CHECKING:
    from vitserve.ipc.direct import DirectStream

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # a connection that has not said hello by then is shut
SHED_FACTOR = 2  # accepted connections past this many times max_connections are shut at once
RESERVED_DESCRIPTORS = 512  # for slabs, worker sockets, files: beyond the connections
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_MONITOR_ENDPOINTS = itertools.count()


@dataclass(eq=False)
class Connection:
    serial: int  # unique for the frontend's life (descriptors are reused)
    fd: int
    opened_at: float  # monotonic seconds
    routing_id: bytes | None = None  # of its first message
    helloed: bool = False
    priorities: tuple[int, int] | None = None  # of its CURVE key's certificate; None: the server's range
    closed: bool = False
    requests: dict[int, int] = field(default_factory=dict)  # the client's request id -> engine key
    inline: dict[int, int] = field(default_factory=dict)  # inline results not yet released: request id -> bytes
    inline_bytes: int = 0  # their sum
    queued: list[int] = field(default_factory=lambda: [0, 0, 0])  # unfinished requests' items, tokens, bytes
    input_token: str = ""  # given in its welcome: claims its input arena over the slab channel
    arena: str = ""  # the input arena it writes its inputs into, once it asked for one
    stream: DirectStream | None = None  # a direct link's (direct_clients.py); None: the ZeroMQ socket's


def seed_routing_ids() -> None:
    """Seed the C library's rand(), which libzmq uses for the first routing id it generates."""
    ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))


def raise_descriptor_limit(needed: int) -> int:
    """Raise the soft descriptor limit to the hard one; ValueError when even that is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(f"max_connections needs about {needed} file descriptors, but this process may open "
                         f"only {hard} (ulimit -Hn): lower max_connections or raise the hard limit")
    return hard


class Connections:
    def __init__(self, socket: zmq.Socket, context: zmq.Context, max_connections: int):
        self.max_connections = max_connections
        self.by_fd: dict[int, Connection] = {}  # the ZeroMQ socket's
        self.direct: dict[int, Connection] = {}  # the direct link's, by serial
        self.counters = {"connections_opened": 0, "connections_refused": 0}
        self._serials = itertools.count(1)
        self._log_limits = LogLimiter(log)
        # The monitor's pipe is unbounded (RCVHWM 0): a full pipe would stall libzmq's I/O thread.
        address = f"inproc://vitserve-connections-{os.getpid()}-{next(_MONITOR_ENDPOINTS)}"
        socket.monitor(address, _EVENTS)
        self.monitor = context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(address)
        self._socket = socket
        self._local: str | int | None = None  # see listening_on

    def __len__(self) -> int:
        return len(self.by_fd) + len(self.direct)

    def all(self) -> Iterator[Connection]:
        yield from list(self.by_fd.values())
        yield from list(self.direct.values())

    def direct_ones(self) -> list[Connection]:
        return list(self.direct.values())

    def take_events(self) -> list[Connection]:
        """Apply the connection events that have arrived; returns the connections that closed."""
        events = []
        while self.monitor.get(zmq.EVENTS) & POLLIN:  # (cheaper than a receive that raises zmq.Again)
            events.append(self.monitor.recv_multipart(zmq.NOBLOCK))
        return self.apply(events)

    def apply(self, events: list[list]) -> list[Connection]:
        """Apply monitor events (each a message of the monitor socket); returns the connections that closed."""
        closed = []
        for frames in events:
            event, fd = struct.unpack("=Hi", frames[0])
            if event == zmq.EVENT_ACCEPTED:
                stale = self.by_fd.get(fd)
                if stale is not None:  # its close was not seen (cannot happen in order): end it anyway
                    closed.append(self._forget(stale))
                self._accepted(fd)
            elif event == zmq.EVENT_DISCONNECTED and fd in self.by_fd:
                closed.append(self._forget(self.by_fd[fd]))
        return closed

    def _accepted(self, fd: int) -> None:
        self.shed_if_over(self.opened(fd))

    def opened(self, fd: int, direct: bool = False) -> Connection:
        """A connection just accepted (its stream, for a direct one, is set by its caller)."""
        connection = Connection(next(self._serials), fd, _now())
        if direct:
            self.direct[connection.serial] = connection
        else:
            self.by_fd[fd] = connection
        self.counters["connections_opened"] += 1
        return connection

    def shed_if_over(self, connection: Connection) -> None:
        """Shut a connection just accepted when far too many are open."""
        if len(self) > SHED_FACTOR * self.max_connections:
            self._log_limits.warning("shed", "%d connections are open, over %d × max_connections=%d: shutting "
                                             "the newest", len(self), SHED_FACTOR, self.max_connections)
            self.shut(connection)

    def _forget(self, connection: Connection) -> Connection:
        connection.closed = True
        del self.by_fd[connection.fd]
        return connection

    def forget(self, connection: Connection) -> bool:
        """A direct connection ended: whether it was still open (its end is then the caller's to apply)."""
        if self.direct.pop(connection.serial, None) is None:
            return False
        connection.closed = True
        return True

    def of_message(self, routing_id: bytes, fd: int) -> tuple[Connection | None, list[Connection]]:
        """The connection a message arrived on, and the connections that closed meanwhile (their
        events are applied first: a descriptor may have been closed and reused since)."""
        closed: list[Connection] = []
        connection = self.by_fd.get(fd)
        if connection is None or (connection.routing_id is not None and connection.routing_id != routing_id):
            closed = self.take_events()
            connection = self.by_fd.get(fd)
        if connection is None:
            return None, closed  # not a connection of ours any more (or no descriptor: not from a peer)
        if connection.routing_id is None:
            connection.routing_id = routing_id
        elif connection.routing_id != routing_id:
            return None, closed
        return connection, closed

    def helloed(self) -> int:
        return sum(1 for connection in self.all() if connection.helloed)

    def overdue(self) -> list[Connection]:
        """Connections that have not said hello within HELLO_TIMEOUT_S."""
        oldest = _now() - HELLO_TIMEOUT_S
        return [c for c in self.all() if not c.helloed and c.opened_at < oldest]

    def listening_on(self, address: str) -> None:
        """The bound endpoint: a descriptor is shut only if it is a connection accepted there."""
        where = address.split("://", 1)[1]
        self._local = where if address.startswith("ipc://") else int(where.rsplit(":", 1)[1])

    def shut(self, connection: Connection) -> None:
        """Shut the connection's socket down; libzmq closes it and reports the disconnect. Only a
        descriptor that is still this connection's: one closed and reused since (by another
        connection, or by libzmq itself) is left alone. A direct connection is closed here."""
        if connection.stream is not None:
            if not connection.closed:
                self.counters["connections_refused"] += 1
                connection.stream.close("shut by the engine")
            return
        if connection.closed or self.by_fd.get(connection.fd) is not connection:
            return
        try:
            borrowed = sockets.socket(fileno=connection.fd)
        except OSError:
            return  # not a socket (any more)
        try:
            local = borrowed.getsockname()
            if (local[1] if isinstance(local, tuple) else local) == self._local:
                borrowed.shutdown(sockets.SHUT_RDWR)
                self.counters["connections_refused"] += 1
        except OSError:
            pass  # not connected any more
        finally:
            borrowed.detach()  # the descriptor stays libzmq's

    def stop_events(self) -> None:
        """Stop the socket's connection events; the owner closes `monitor` after this, never before:
        libzmq's I/O thread sends each event to the monitor's PAIR while holding the lock that
        disabling takes, and a send to a PAIR whose reader is gone blocks for ever, so an event (a
        client disconnecting) between closing the reader and disabling would hang the close."""
        self._socket.disable_monitor()


def _now() -> float:
    return time.monotonic()
