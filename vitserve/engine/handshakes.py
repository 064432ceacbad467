"""The frontend's handshakes: a connection's hello is answered with the welcome (the protocol version,
the served model, its input arena's token) once the engine is ready, or refused (another protocol
version, past max_connections); and the input arena a welcomed connection asks for over the slab channel.

A mixin of `Frontend` (frontend.py), which owns the sockets, the connections and the engine.
"""

from __future__ import annotations

import asyncio
import secrets

import zmq

from vitserve.ipc.messages import PROTOCOL_VERSION, Welcome
from vitserve.ipc.slabs import SlabError

from .connections import Connection

REFUSAL_LINGER_S = 1.0  # a refused connection is shut this long after its refusal, which may reach it first


class Handshakes:
    def engine_started(self) -> None:
        """Welcome the connections that said hello while the engine was starting (and are still open)."""
        waiting, self._hellos_waiting = self._hellos_waiting, set()
        for connection in waiting:
            if not connection.closed and not connection.helloed:
                self._hello(connection, PROTOCOL_VERSION, None)

    def _hello(self, connection: Connection, version: int, header: zmq.Frame | None) -> None:
        if version != PROTOCOL_VERSION:
            self._error(connection, None, "protocol", f"protocol version {version} is not supported; "
                                                      f"this engine speaks version {PROTOCOL_VERSION}")
            return
        if not connection.helloed and self.connections.helloed() >= self.limits.max_connections:
            self._error(connection, None, "overloaded", f"the engine serves its limit of "
                                                        f"{self.limits.max_connections} connections "
                                                        f"(max_connections): try again later", 1000.0)
            asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self.connections.shut, connection)
            return
        if header is not None and self._key_priorities:  # the client's key, as the CURVE handshake authenticated it
            connection.priorities = self._key_priorities.get(_user_id(header))
        if not self.engine.started:  # the welcome names the model's outputs: it waits for the start
            self._hellos_waiting.add(connection)
            return
        connection.helloed = True
        if self.slab_channel is not None and self.limits.input_arena_bytes and not connection.input_token:
            connection.input_token = secrets.token_hex(16)
            self._input_tokens[connection.input_token] = connection
        self._send(connection, Welcome(PROTOCOL_VERSION, self.engine.model, connection.input_token))

    def _arena(self, token: str) -> tuple[str, int]:
        """The input arena of the connection whose welcome gave `token` (made on its first ask)."""
        connection = self._input_tokens.get(token)
        if connection is None or connection.closed:
            raise SlabError("no open connection has this token: ask with the token of your connection's welcome")
        if not connection.arena:
            connection.arena = self.engine.inputs.new_arena().name
        return connection.arena, self.engine.inputs.arenas[connection.arena].fd


def _user_id(header: zmq.Frame) -> str | None:
    """The User-Id that authentication gave the message's connection (a CURVE client's public key)."""
    try:
        return header.get("User-Id")
    except zmq.ZMQError:  # not authenticated
        return None
