"""The ZeroMQ frontend: a ROUTER socket on ipc:// or tcp:// in front of an Engine.

Every message is read on a connection the frontend knows (connections.py): requests, their
replies, cancels and releases belong to that connection, never to a routing id a peer may
claim. Messages are decoded with one typed decoder whose element counts are bounded; anything
that is not a valid message gets an `error` reply with a code (logged at a limited rate), and the
connection stays usable; a message of more frames than any request has shuts its connection. A
connection must say hello first. An encode request is checked against the client's limits
(limits.py), admitted and queued at once; the reply goes out from its future's callback, so a
slow window never blocks other clients. Outputs stay leased until the client sends `release`
(inline outputs are copied into the reply and released at once, and their bytes count against
the client until it acknowledges them with a release), or until its connection closes.

The endpoint is bound when the Frontend is made, before the engine it will serve has started
(minutes of model load and graph capture): a taken endpoint fails at once (see ipc/endpoints.py).
Its socket file is removed when serving ends, or by `close()` when the engine never started.

Beside an ipc:// endpoint the frontend also listens for local clients on the direct link
(direct_clients.py; not with CURVE keys, which only the ZeroMQ socket checks): the same messages and
the same handling, without ZeroMQ's I/O threads on either side.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math

import zmq

from vitserve.ipc.auth import ServerKeys, check_exposure, serve_with_curve
from vitserve.ipc.burst import BurstSocket
from vitserve.ipc.codec import ProtocolError, server_codec
from vitserve.ipc.endpoints import DEFAULT_SOCKET_MODE, bind_endpoint
from vitserve.ipc.messages import (
    MAX_ITEMS_PER_REQUEST, Cancel, Encode, Error, Forget, HealthQuery, Hello, Lookup, Ping, Pong, Release, Stats,
    StatsQuery,
)
from vitserve.ipc.slab_channel import SlabChannel
from vitserve.log_limits import LogLimiter

from .client_requests import ClientRequests
from .handshakes import Handshakes
from .config import EngineConfig
from .connections import (
    RESERVED_DESCRIPTORS, SHED_FACTOR, Connection, Connections, raise_descriptor_limit, seed_routing_ids,
)
from .direct_clients import DirectClients
from .engine import Engine

log = logging.getLogger(__name__)

CLIENT_CHECK_S = 1.0  # how often hello timeouts and reclaimed leases are checked
MAX_HEADER_BYTES = 1 << 20  # a message header (the frames' descriptions) is far smaller
MAX_FRAMES = MAX_ITEMS_PER_REQUEST + 1  # a header and one frame per item
CLOSE_LINGER_MS = 2000  # at shutdown, replies already queued get this long to reach their clients
UNREAD_REPLIES_PER_CLIENT = 1000  # ZeroMQ's default high-water mark, made explicit: replies past it are dropped
# tcp:// peers that vanish without closing (a host gone) are found by ZMTP heartbeats
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 10_000, 30_000


class Frontend(ClientRequests, Handshakes):
    def __init__(self, endpoint: str, config: EngineConfig, socket_mode: int = DEFAULT_SOCKET_MODE,
                 keys: ServerKeys | None = None, allow_insecure_tcp: bool = False):
        """Bind `endpoint` (EndpointError when it is taken or unusable; AuthError when it would serve
        other hosts unauthenticated); with `keys`, only the clients they name get a connection.
        `serve(engine)` answers on it."""
        check_exposure(endpoint, keys is not None, allow_insecure_tcp)
        self.engine: Engine | None = None
        self.limits = config.clients
        self._key_priorities = keys.priorities if keys is not None else {}  # User-Id -> (lowest, highest)
        raise_descriptor_limit(SHED_FACTOR * self.limits.max_connections + RESERVED_DESCRIPTORS)
        self._codec = server_codec()
        self._log_limits = LogLimiter(log)
        self._context = zmq.Context()
        seed_routing_ids()  # before the socket: its first generated routing id comes from rand()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        # A reply that cannot go out (its client is gone, or has this many unread replies) raises
        # instead of vanishing: it is counted, and a result's rows are freed at once.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.SNDHWM, UNREAD_REPLIES_PER_CLIENT)
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        # A frame larger than any admissible request is not even read: its sender is disconnected.
        socket.setsockopt(zmq.MAXMSGSIZE, config.max_request_bytes + MAX_HEADER_BYTES)
        self.connections = Connections(socket, self._context, self.limits.max_connections)  # before the bind
        self._authenticator = None if keys is None else serve_with_curve(self._context, socket, keys)
        self._bound = None
        self.slab_channel: SlabChannel | None = None
        self.direct: DirectClients | None = None
        try:
            self._bound = bind_endpoint(socket, endpoint, socket_mode)
            # Local clients get the slabs' descriptors beside the endpoint (ipc/slab_channel.py).
            self.slab_channel = SlabChannel(self._bound.path, socket_mode) if self._bound.path else None
            if self._bound.path and keys is None:
                self.direct = DirectClients(self._bound.path, socket_mode, self.connections, MAX_FRAMES,
                                            MAX_HEADER_BYTES, config.max_request_bytes + MAX_HEADER_BYTES,
                                            UNREAD_REPLIES_PER_CLIENT)
        except BaseException:
            if self.slab_channel is not None:
                self.slab_channel.close()
            if self._bound is not None:
                self._bound.release()
            if self._authenticator is not None:
                self._authenticator.stop()
            self.connections.stop_events()
            self.connections.monitor.close(0)
            socket.close(0)
            self._context.term()
            raise
        self.endpoint = self._bound.address
        self._slab_task: asyncio.Task | None = None
        self.connections.listening_on(self.endpoint)
        self.socket = BurstSocket(socket)
        self._events = BurstSocket(self.connections.monitor)
        self.counters = {"requests": 0, "results": 0, "errors": 0, "replies_dropped": 0}
        self.error_codes: collections.Counter[str] = collections.Counter()  # the errors, by code (/metrics)
        self._watcher: asyncio.Task | None = None
        self._queued_items = 0  # items of every client's unfinished requests
        self._hellos_waiting: set[Connection] = set()  # said hello while the engine started: welcomed once ready
        self._input_tokens: dict[str, Connection] = {}  # welcome token -> its connection, while it is open

    def watch(self) -> None:
        """Keep the connections in bounds from now on (floods, silent peers), also while the engine starts."""
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_connections())

    async def serve(self, engine: Engine) -> None:
        """Answer messages for `engine` (started) until cancelled; then close."""
        self.engine = engine
        self.watch()
        if self.slab_channel is not None:
            self._slab_task = asyncio.ensure_future(self.slab_channel.serve(engine.slab_descriptor, self._arena))
        if self.direct is not None:
            self.direct.start(self._checked, engine.dispatch_now, lambda connection: self._ended([connection]))
        try:
            while True:
                burst = await self.socket.receive()
                self._ended(self.connections.take_events())  # closes before these messages came in
                for identity, *frames in burst:
                    self._receive(identity.bytes, frames)
                engine.dispatch_now()
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening and remove the socket file (if still ours); replies already queued get
        CLOSE_LINGER_MS. Safe to call more than once."""
        if self._context.closed:
            return
        if self._watcher is not None:
            self._watcher.cancel()
        if self._slab_task is not None:
            self._slab_task.cancel()
        if self.slab_channel is not None:
            self.slab_channel.close()
        if self.direct is not None:
            self.direct.close()
        self.connections.stop_events()  # before the reader closes (see stop_events)
        self._events.close()
        self.socket.close(CLOSE_LINGER_MS)
        self._bound.release()  # before the linger: new clients find no engine rather than a closing one
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    async def _watch_connections(self) -> None:
        """Apply connection events as they come (a flood is shed while it happens), shut the
        connections that never said hello, forget requests whose leases expired."""
        while True:
            events = await self._events.receive(CLIENT_CHECK_S)
            try:
                self._ended(self.connections.apply(events) + self.connections.take_events())
                for connection in self.connections.overdue():
                    self.connections.shut(connection)
                if self.engine is not None:
                    self._forget_reclaimed()
            except Exception:  # the watch must go on: it is what frees a closed connection's rows
                self._log_limits.error("watch", "checking connections failed", exc_info=True)

    def _receive(self, routing_id: bytes, frames: list) -> None:
        fd = frames[0].get(zmq.SRCFD) if frames else -1
        connection, closed = self.connections.of_message(routing_id, fd)
        self._ended(closed)
        if connection is None:
            return  # from a connection that has closed since: nobody to answer
        self._checked(connection, frames)

    def _checked(self, connection: Connection, frames: list) -> None:
        """A message of `connection` (either socket's), handled within the protocol's bounds."""
        if len(frames) > MAX_FRAMES or (frames and len(frames[0]) > MAX_HEADER_BYTES):
            self._log_limits.warning("frames", "a message of %d frames (header %d bytes) exceeds the protocol's "
                                     "bounds: shutting its connection", len(frames), len(frames[0]) if frames else 0)
            self.connections.shut(connection)
            return
        try:
            self._handle(connection, frames)
        except Exception as err:  # one message must never stop the server
            self._log_limits.error("handle", "a message could not be handled", exc_info=True)
            self._send(connection, Error(None, "protocol", f"the message could not be handled: {err}"))

    def _handle(self, connection: Connection, frames: list) -> None:
        try:
            message, arrays = self._codec.decode(frames)
        except ProtocolError as err:
            self._log_limits.warning("protocol", "undecodable message: %s", err)
            self._error(connection, None, err.code, str(err))
            return
        if not connection.helloed and not isinstance(message, (Hello, HealthQuery, Ping)):
            self._error(connection, getattr(message, "id", None), "protocol",
                        "say hello first: send a hello with the protocol version before anything else")
            return
        match message:
            case Hello(version=version):
                self._hello(connection, version, frames[0])
            case Encode():
                self._encode(connection, message, arrays)
            case Lookup():
                self._lookup(connection, message)
            case Forget(names=names):
                self._forget(names)
            case Cancel(id=request_id):
                key = connection.requests.get(request_id)
                if key is not None:
                    self.engine.cancel(key)
            case Release(ids=request_ids):
                self._release(connection, request_ids)
            case StatsQuery():
                self._send(connection, Stats(self.stats()))
            case HealthQuery():
                self._send(connection, self.engine.health())
            case Ping():
                self._send(connection, Pong())

    def stats(self) -> dict[str, float]:
        """The frontend's and the engine's counters and gauges: what a stats query and /metrics give."""
        counters = self.counters | self.connections.counters | (self.slab_channel.counters if self.slab_channel else {})
        return ({name: float(value) for name, value in counters.items()} | {"connections": float(len(self.connections))}
                | self.engine.stats())

    def _ended(self, closed: list[Connection]) -> None:
        """Closed connections: what they still wait for is cancelled, what they hold is released."""
        for connection in closed:
            if self.engine is not None:
                for key in connection.requests.values():
                    self.engine.release(key)
                if connection.arena:  # after its requests: none is queued to read from it any more
                    self.engine.inputs.drop_arena(connection.arena)
            connection.requests.clear()
            self._input_tokens.pop(connection.input_token, None)

    def _forget_reclaimed(self) -> None:
        """Requests the engine no longer holds (leases that expired) are no longer the clients'."""
        for connection in self.connections.all():
            gone = [request_id for request_id, key in connection.requests.items() if not self.engine.is_open(key)]
            for request_id in gone:
                del connection.requests[request_id]

    def _error(self, connection: Connection, request_id: int | None, code: str, text: str,
               retry: float | None = None) -> None:
        self.counters["errors"] += 1
        self.error_codes[code] += 1
        self._send(connection, Error(request_id, code, text, retry))

    def _send(self, connection: Connection, message, frames: list | None = None) -> bool:
        """Whether the reply went out; one that cannot (a closed connection, or one not reading) is counted."""
        if self.socket.socket.closed:
            return False  # the server stopped: requests still ending (failed by the engine's close) go unanswered
        sent = False
        if connection.stream is not None:
            sent = connection.stream.send_now(self._codec.encode(message, frames or []))
        elif not connection.closed:
            try:
                sent = self.socket.send_now([connection.routing_id, *self._codec.encode(message, frames or [])])
            except zmq.ZMQError:  # EHOSTUNREACH: the connection is gone
                sent = False
        if not sent:
            self.counters["replies_dropped"] += 1
            dropped = self.counters["replies_dropped"]
            if math.log10(dropped).is_integer():  # 1, 10, 100...: a trend, not a line per reply
                log.warning("%d replies could not be delivered so far (clients gone, or not reading theirs)",
                            dropped)
        return sent

