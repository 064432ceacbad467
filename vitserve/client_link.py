"""The client's link to its engine: the connection, its handshake, and noticing its loss.

A request belongs to the connection it was sent on, so a lost connection (the engine was killed,
restarted or stopped answering: heartbeats find a silent one) ends every request and query
waiting on it with `unavailable`, and the transport's reconnection brings a new connection, which
says hello before anything else goes out (requests wait for its welcome). A handshake the engine
refuses (CURVE keys it does not admit) is reported at once rather than after the connect timeout.

The link is the engine's direct link over ipc:// when it offers one, else ZeroMQ's socket
(client_direct.py), chosen as the client connects.

A mixin of `AsyncClient` (client.py), which owns the transport and the requests waiting.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import zmq

from vitserve.client_direct import CONNECTED, DISCONNECTED, RECONNECT_S, DirectTransport, ZmqTransport
from vitserve.engine.errors import EngineError
from vitserve.ipc.auth import connect_with_curve
from vitserve.ipc.messages import PROTOCOL_VERSION, Error, Health, Hello, Ping, Stats, Welcome

CONNECT_TIMEOUT_S = 30.0
HEARTBEAT_S = 2.0  # ZMTP heartbeats: a silent engine (stopped, host gone) is noticed within three of them
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED


class ClientLink:
    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> Welcome:
        """Connect and shake hands (protocol version); raises ConnectionError when no engine answers."""
        self._loop = asyncio.get_running_loop()
        began = self._loop.time()
        if self._transport is None:
            await self._open_transport(began + timeout_s)
        try:
            reply = await self._handshake(max(began + timeout_s - self._loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise ConnectionError(f"no vitserve engine answered at {self.endpoint} within {timeout_s:.0f} s") from None
        message, _ = self._codec.decode(reply)
        match message:
            case Welcome():
                self._welcomed(message)
            case Error(message=text):
                raise ConnectionError(f"the engine at {self.endpoint} refused the connection: {text}")
            case _:
                raise ConnectionError(f"the engine at {self.endpoint} answered the hello with "
                                      f"{type(message).__name__}, not a welcome")
        self._receiver = asyncio.ensure_future(self._receive())
        self._watcher = asyncio.ensure_future(self._watch_link())
        await asyncio.shield(self._arena_asked)  # the first requests already use the input arena
        return self.welcome

    async def _open_transport(self, deadline: float) -> None:
        """The direct link when the engine offers one here, else a ZeroMQ socket connecting (which
        reconnects by itself). An engine not started yet (no endpoint) is waited for until
        `deadline` (loop time), so that a client started alongside it takes its link too."""
        endpoint_path = self.endpoint.removeprefix("ipc://")
        while self._link_path:
            try:
                self._transport = DirectTransport(self._link_path, self._codec.encode(Ping()), self.heartbeat_s)
                return
            except OSError:
                pass
            if os.path.exists(endpoint_path) or self._loop.time() >= deadline:
                break  # an engine that offers no link (CURVE keys), or a stale link: ZeroMQ
            await asyncio.sleep(RECONNECT_S)
        self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # A random routing id of our own: the ids ZeroMQ would generate are a counter that others
        # could predict (the server binds requests to the connection, not to this id, either way).
        socket.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(15))
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1e3))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * self.heartbeat_s * 1e3))
        if self._curve is not None:
            connect_with_curve(socket, Path(self._curve[0]), Path(self._curve[1]))
        self._transport = ZmqTransport(socket, LINK_EVENTS)
        socket.connect(self.endpoint)

    async def _handshake(self, timeout_s: float) -> list:
        """The reply to the hello; ConnectionError as soon as the engine refuses the connection's
        handshake (a CURVE key it does not accept, or none where it requires one)."""
        async def exchange() -> list:
            await self._transport.send(self._hello())  # waits for the connection (and its handshake) to be up
            return await self._transport.receive_one()

        reply = asyncio.ensure_future(asyncio.wait_for(exchange(), timeout_s))
        try:
            while True:
                link = asyncio.ensure_future(self._transport.events())
                await asyncio.wait({reply, link}, return_when=asyncio.FIRST_COMPLETED)
                link.cancel()
                if reply.done():
                    return reply.result()
                if any(event & HANDSHAKE_FAILED for event in link.result()):
                    raise ConnectionError(f"the engine at {self.endpoint} refused the connection's handshake: "
                                          f"its CURVE keys do not admit this client (curve_secret_key, "
                                          f"curve_server_key), or it requires keys this client did not give")
        finally:
            reply.cancel()

    def _hello(self) -> list:
        return self._codec.encode(Hello(PROTOCOL_VERSION, self.name))

    async def _watch_link(self) -> None:
        """A lost connection ends every request and query waiting on it (the engine ends them too:
        requests belong to their connection); the new one says hello before anything else goes."""
        connected = True
        while True:
            events = await self._transport.events(self.heartbeat_s)
            for event in events:
                if event == DISCONNECTED:
                    connected = False
                    while messages := self._transport.take():  # replies that came before the loss are theirs
                        for message in messages:
                            self._dispatch(message)
                    if self._ready.is_set():
                        self._lost(f"the connection to the engine at {self.endpoint} was lost (the engine stopped, "
                                   f"restarted or stopped answering): the request may or may not have run")
                elif event == CONNECTED:
                    connected = True
                    if not self._ready.is_set():  # (the first connection's hello is connect()'s)
                        self._send_control(self._hello())
            if not events and connected and not self._ready.is_set():
                # No welcome within a beat: the hello may be lost (libzmq takes the first message of a
                # peer whose routing id the engine still holds for the old connection as its name).
                self._send_control(self._hello())

    def _lost(self, reason: str) -> None:
        self._ready.clear()
        self._generation += 1
        self._lost_ids = set(self._waiting) | self._cancelled  # the engine ended them with the connection
        self._cancelled.clear()
        self._releases.clear()
        error = EngineError("unavailable", reason)
        for future in [*self._waiting.values(), *self._queries[Stats], *self._queries[Health]]:
            if not future.done():
                future.set_exception(error)
        self._queries = {Stats: [], Health: []}

    async def _until_ready(self, limit: float | None) -> None:
        """Wait for a welcomed connection (after a lost one, the new one's hello)."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), limit)
        except asyncio.TimeoutError:
            raise EngineError("unavailable", f"no connection to the engine at {self.endpoint} within "
                                             f"{limit:.1f} s") from None

