"""The slab channel: how a local client gets the output slabs it reads, as read-only descriptors,
and its input arena (ipc/input_slabs.py), which it writes.

Slabs are sealed memory files with no name in any file system, so a client cannot open one; it
asks the engine over a Unix socket beside the ipc:// endpoint (`<endpoint path>.slabs`, same
permissions) and receives the descriptor with the reply (SCM_RIGHTS). That works wherever the
endpoint's socket file is reachable: another user's process the socket mode lets in, another
container sharing the socket's directory. A client asks once per slab (a few per worker and
restart), one question per connection: connect, ask, receive, close. It asks for its arena with
the token of its welcome, which names its connection to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket as sockets
from typing import Callable

import msgspec

from vitserve.log_limits import LogLimiter

from .endpoints import SLAB_CHANNEL_SUFFIX, bind_unix_socket
from .messages import ArenaAsk, SlabAsk, SlabGrant, SlabMessage
from .slabs import SlabError

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0  # a client asks as soon as it connects; silence this long ends the connection
MAX_ANSWERING = 64  # connections being answered at once; past that, the oldest is dropped for a new one
ACCEPT_PAUSE_S = 0.1  # out of descriptors: accepting waits this long instead of spinning
MAX_MESSAGE_BYTES = 1024


def channel_path(endpoint_path: str) -> str:
    return endpoint_path + SLAB_CHANNEL_SUFFIX


def ask_for_slab(path: str, slab: str, timeout_s: float = 5.0) -> int:
    """A read-only descriptor of `slab` from the engine whose slab channel is at `path`; OSError or
    ValueError saying why not."""
    return _ask(path, SlabAsk(slab), slab, timeout_s)[1]


def ask_for_arena(path: str, token: str, timeout_s: float = 5.0) -> tuple[str, int]:
    """(name, descriptor) of the input arena of the connection whose welcome gave `token`; OSError or
    ValueError saying why not (e.g. the engine gives no more arenas)."""
    return _ask(path, ArenaAsk(token), None, timeout_s)


def _ask(path: str, ask: SlabAsk | ArenaAsk, slab: str | None, timeout_s: float) -> tuple[str, int]:
    what = f"slab {slab}" if slab is not None else "an input arena"
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_SEQPACKET) as channel:
        channel.settimeout(timeout_s)
        try:
            channel.connect(path)
            channel.send(msgspec.msgpack.encode(ask))
            data, fds, _, _ = sockets.recv_fds(channel, MAX_MESSAGE_BYTES, 1)
        except OSError as error:
            raise OSError(error.errno, f"the engine's slab channel {path} did not answer ({error.strerror or error}): "
                                       f"run the client where it can reach the endpoint's directory, or pass "
                                       f"inline=True") from None
    try:
        grant = msgspec.msgpack.decode(data, type=SlabMessage)
        if not isinstance(grant, SlabGrant) or (slab is not None and grant.slab != slab):
            raise ValueError(f"the slab channel {path} answered {grant!r} to a request for {what}")
        if grant.error:
            raise ValueError(f"the engine did not give {what}: {grant.error}")
        if len(fds) != 1:
            raise ValueError(f"the slab channel {path} sent {len(fds)} descriptors for {what}")
    except (ValueError, msgspec.DecodeError):
        for fd in fds:
            sockets.close(fd)
        raise
    return grant.slab, fds[0]


class SlabChannel:
    """The engine's side: answers each connection's one question with a read-only descriptor of the
    slab it names (`lookup(name)`: the pool's descriptor, not a copy; None for no such slab), or the
    descriptor of an input arena (`arena(token)`: (name, descriptor), or SlabError saying why not)."""

    def __init__(self, endpoint_path: str, mode: int):
        self.path = channel_path(endpoint_path)
        self._listener, self._bound = bind_unix_socket(self.path, mode, sockets.SOCK_SEQPACKET, MAX_ANSWERING)
        self._listener.setblocking(False)
        self._answering: dict[asyncio.Task, None] = {}  # oldest first
        self._log_limits = LogLimiter(log)
        self.counters = {"slabs_granted": 0, "slab_asks_refused": 0}

    async def serve(self, lookup: Callable[[str], int | None],
                    arena: Callable[[str], tuple[str, int]] | None = None) -> None:
        """Answer until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    connection, _ = await loop.sock_accept(self._listener)
                except OSError as error:  # e.g. out of descriptors: the next accept may succeed
                    self._log_limits.warning("accept", "slab channel: accept failed: %s", error)
                    await asyncio.sleep(ACCEPT_PAUSE_S)
                    continue
                if len(self._answering) >= MAX_ANSWERING:
                    # An honest client asks as soon as it connects and is answered at once: the
                    # oldest of this many is a silent one, so it goes (its connection is closed).
                    next(iter(self._answering)).cancel()
                    self.counters["slab_asks_refused"] += 1
                task = loop.create_task(self._answer(connection, lookup, arena))
                self._answering[task] = None
                task.add_done_callback(self._answering.pop)
        finally:
            for task in list(self._answering):
                task.cancel()

    async def _answer(self, connection: sockets.socket, lookup: Callable[[str], int | None],
                      arena: Callable[[str], tuple[str, int]] | None) -> None:
        with connection:
            connection.setblocking(False)
            try:
                data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(connection, MAX_MESSAGE_BYTES),
                                              ASK_TIMEOUT_S)
                ask = msgspec.msgpack.decode(data, type=SlabMessage)
            except (asyncio.TimeoutError, OSError, msgspec.DecodeError) as error:
                self.counters["slab_asks_refused"] += 1
                self._log_limits.warning("ask", "slab channel: a connection sent no readable question (%s)",
                                         type(error).__name__)
                return
            match ask:
                case SlabAsk(slab=slab):
                    fd = lookup(slab)
                    grant = SlabGrant(slab, "" if fd is not None else "no such slab (its worker restarted, or the "
                                                                      "engine did: request the result again)")
                case ArenaAsk(token=token) if arena is not None:
                    try:
                        name, fd = arena(token)
                        grant = SlabGrant(name)
                    except SlabError as error:
                        fd, grant = None, SlabGrant("", str(error))
                case _:
                    self.counters["slab_asks_refused"] += 1
                    return
            with contextlib.suppress(OSError):  # the asker left already: nothing to answer
                sockets.send_fds(connection, [msgspec.msgpack.encode(grant)], [fd] if fd is not None else [])
                self.counters["slabs_granted" if fd is not None else "slab_asks_refused"] += 1

    def close(self) -> None:
        """Stop listening and remove the socket file (if still ours). Safe to call more than once."""
        self._listener.close()
        self._bound.release()
