"""Clients of a running engine: `AsyncClient` (asyncio), here, and `Client`, its thin sync wrapper (sync_client.py).

    with Client(endpoint) as client:           # the engine's --endpoint
        with client.encode([image]) as result:
            result.items[0].embeddings          # (rows, out_hidden), viewing shared memory

On ipc:// the outputs are read in place from the engine's shared memory; on tcp:// (another
host) they come inline in the reply. Results are released with `release()`, at the end of
their `with` block, or when garbage-collected (or when the connection is lost: the engine
releases what a closed connection held); a failed request raises EngineError with its code
(`overloaded` carries a retry hint; `unavailable` when the connection to the engine was lost;
`deadline_exceeded` when no reply came within the deadline plus a margin, or `timeout_s`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zmq

from vitserve.checks import check_seconds
from vitserve.client_arena import ClientArena
from vitserve.client_kept import ClientKeptItems
from vitserve.client_direct import DirectTransport, ZmqTransport
from vitserve.client_link import HEARTBEAT_S, ClientLink
from vitserve.client_releases import ClientReleases
from vitserve.engine.errors import EngineError
from vitserve.ipc.direct import link_path
from vitserve.ipc.codec import ProtocolError, array_ref, client_codec
from vitserve.ipc.messages import (
    Encode, Error, Found, Health, HealthQuery, ImageItem, Lookup, PatchItem, Pong, Result, ServedModel, Stats,
    StatsQuery, VideoItem, Welcome,
)
from vitserve.ipc.endpoints import split_endpoint
from vitserve.ipc.outputs import Encoded, encoded_from_refs
from vitserve.ipc.slab_channel import ask_for_slab, channel_path
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabError

TIMEOUT_S = 300.0  # default wait for the reply to a request without a deadline
REPLY_MARGIN_S = 5.0  # a request with a deadline is given up this long after it: the engine ends it by then
ARENA_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))  # what inputs are; anything else goes as a frame (and is refused)


def _no_slabs(slab: str) -> int:
    raise SlabError(f"a reference to slab {slab} reached a tcp:// client, which can only take results inline")


class AsyncClient(ClientLink, ClientReleases, ClientKeptItems):
    def __init__(self, endpoint: str, *, inline: bool | None = None, name: str = "",
                 timeout_s: float | None = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
                 curve_secret_key: str | Path | None = None, curve_server_key: str | Path | None = None,
                 direct: bool = True):
        """timeout_s: how long a request without a deadline waits for its reply (None: for ever; a
        request with a deadline waits deadline + REPLY_MARGIN_S). heartbeat_s: how often the link to
        the engine is checked; a connection silent for three beats is taken for lost.
        curve_secret_key, curve_server_key: this client's secret certificate and the server's public
        one (files from `vitserve keys`), for an engine that requires CURVE authentication.
        direct: over ipc://, talk over the engine's direct link (a Unix socket beside the endpoint,
        without ZeroMQ's I/O threads) when it offers one; False: always ZeroMQ."""
        check_seconds("timeout_s", timeout_s, "or None to wait for ever", none_ok=True)
        check_seconds("heartbeat_s", heartbeat_s, "a silent engine is noticed within three beats")
        if (curve_secret_key is None) != (curve_server_key is None):
            raise ValueError("curve_secret_key and curve_server_key go together: give both, or neither")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        scheme, where = split_endpoint(endpoint)
        self.inline = scheme == "tcp" if inline is None else inline
        if not self.inline and scheme != "ipc":
            raise ValueError(f"inline=False needs an ipc:// endpoint, not {endpoint!r}: results in shared memory are "
                             f"passed over the socket beside it (slab channel); leave inline unset for tcp://")
        self.name = name
        self.welcome: Welcome | None = None
        self._curve = (curve_secret_key, curve_server_key) if curve_secret_key is not None else None
        # Over ipc://, the engine's direct link beside the endpoint when it offers one (client_direct.py).
        self._link_path = link_path(where) if scheme == "ipc" and direct and self._curve is None else ""
        self._transport: ZmqTransport | DirectTransport | None = None  # opened by connect()
        self._context: zmq.Context | None = None
        self._ready = asyncio.Event()  # connected and welcomed: requests may go out
        self._generation = 0  # connections so far: what an earlier one held, the engine has released
        self._codec = client_codec()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._cancelled: set[int] = set()  # requests given up on whose result may still arrive
        self._lost_ids: set[int] = set()  # requests failed with their lost connection: a late reply is dropped
        self.stray_replies: list[str] = []  # replies for no request awaiting one (a second reply would be one)
        # Slabs come as descriptors over the channel beside the endpoint; an inline client gets none.
        self._reader = SlabReader(functools.partial(ask_for_slab, channel_path(where)) if scheme == "ipc"
                                  else _no_slabs)
        self._channel = channel_path(where) if scheme == "ipc" else ""
        self._arena = ClientArena("", "")  # the connection's input arena, once welcomed (_welcomed)
        self._arena_asked: asyncio.Future | None = None
        self._releases: list[int] = []  # gathered during one loop turn, sent as one message
        # stats and health queries in flight, by reply type; each type is answered in order
        self._queries: dict[type, list[asyncio.Future]] = {Stats: [], Health: []}
        self._receiver: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
                     keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        """Images (uint8 H×W×3), videos (uint8 T×H×W×3) or (pixel_values, grid_thw) pairs. `keep`: a name
        per item ('' for none) that `lookup` finds it under, from any client, for `keep_s` seconds at
        most (default and limit: the engine's kept_timeout_s) or until `forget`."""
        request_id = next(self._ids)
        arrays, grids = [], []  # each item's array, and the grid of processed patches (None for pixels)
        for item in items:
            pair = isinstance(item, tuple) and len(item) == 2
            values, grid = item if pair else (item, None)
            arrays.append(np.asarray(values.numpy() if isinstance(values, torch.Tensor) else values))
            grids.append(tuple(int(x) for x in np.asarray(grid).reshape(-1)) if pair else None)
        limit = self.timeout_s if deadline_ms is None else deadline_ms / 1e3 + REPLY_MARGIN_S
        began = self._loop.time()
        await self._until_ready(limit)
        arena = self._arena
        placed = arena.place(arrays) if all(a.dtype in ARENA_DTYPES for a in arrays) else None
        if placed is not None:  # written into the arena: only the header crosses the socket
            refs, frames = [array_ref(a, -1, offset=o) for a, o in zip(arrays, placed[1])], []
        else:
            frames = [np.ascontiguousarray(a) for a in arrays]
            refs = [array_ref(a, i) for i, a in enumerate(frames)]
        wire_items = [PatchItem(ref, grid) if grid is not None else VideoItem(ref) if len(ref.shape) == 4
                      else ImageItem(ref) for ref, grid in zip(refs, grids)]
        message = Encode(request_id, wire_items, deadline_ms, priority, self.inline,
                         None if keep is None else list(keep), keep_s)
        try:
            return await self._exchange(request_id, message, frames, limit, began)
        finally:
            if placed is not None:  # the request ended (or was given up on: only its own inputs could change)
                arena.give(placed[0])

    async def _exchange(self, request_id: int, message: Encode | Lookup, frames: list, limit: float | None,
                        began: float) -> Encoded:
        """Send a request and wait for its one reply: its outputs, or an EngineError."""
        future = self._loop.create_future()
        self._waiting[request_id] = future
        try:
            await self._transport.send(self._codec.encode(message, frames))
        except BaseException:  # not sent: nothing to cancel at the engine
            self._waiting.pop(request_id, None)
            raise
        try:
            # Awaited directly (one wake-up of this task when the reply comes); a timeout or the
            # caller's cancel cancels the future unless the reply has set it already.
            try:
                async with asyncio.timeout_at(None if limit is None else began + limit):
                    reply, reply_frames = await future
            except TimeoutError:
                if future.cancelled():
                    self._give_up(request_id)
                    raise EngineError("deadline_exceeded", f"no reply within {limit:.1f} s (the deadline plus "
                                                           f"{REPLY_MARGIN_S:g} s, or timeout_s): the request was "
                                                           f"cancelled") from None
                reply, reply_frames = future.result()  # it came as time ran out
        except asyncio.CancelledError:  # the caller gave up: the engine drops the request (or its result)
            if future.done() and not future.cancelled() and future.exception() is None:  # a reply came meanwhile
                self._unwanted(request_id, future.result()[0])
            elif request_id in self._waiting:  # no reply yet (`_dispatch` takes a late one)
                self._give_up(request_id)
            raise
        finally:
            self._waiting.pop(request_id, None)
        match reply:
            case Error(code=code, message=text, retry_after_ms=retry):
                raise EngineError(code, text, retry)
            case Result(outputs=refs) | Found(outputs=refs):
                if self.inline:  # the bytes are here: acknowledge them, the engine counts them until then
                    self._send_release(request_id)
                    return encoded_from_refs(refs, self._reader, None, frames=reply_frames)
                release = self._releaser(request_id)
                try:
                    return encoded_from_refs(refs, self._reader, release, frames=reply_frames)
                except (SlabError, OSError, ValueError):  # e.g. the slab channel out of reach: rows go back at once
                    release()
                    raise

    @property
    def model(self) -> ServedModel:
        """The engine's model (after `connect`): its type, the fingerprint of its vision weights, dtype,
        outputs, limits and preprocessing settings."""
        if self.welcome is None:
            raise RuntimeError("not connected yet: `await client.connect()` (or `async with AsyncClient(...)`) first")
        return self.welcome.model

    def _welcomed(self, welcome: Welcome) -> None:
        """A connection is ready: requests may go, into its own input arena (the last one's is gone)."""
        self.welcome = welcome
        self._arena.close()
        self._arena = ClientArena(self._channel, welcome.input_token if self._channel else "")
        self._arena_asked = asyncio.ensure_future(self._arena.open())
        self._ready.set()

    async def stats(self) -> dict[str, float]:
        """The engine's counters: requests, results, errors, queued items, open requests, leased slots..."""
        return dict((await self._query(StatsQuery(), Stats)).values)

    async def health(self) -> Health:
        """Whether the engine serves now (`ready`: admitting, with a worker up), its workers, their pids."""
        return await self._query(HealthQuery(), Health)

    async def _query(self, query: StatsQuery | HealthQuery, reply_type: type):
        """The engine's answer within timeout_s: an engine that holds its connection open but stops
        answering (stuck, or closing) must not hold a health probe for ever."""
        began = self._loop.time()
        await self._until_ready(self.timeout_s)
        future = self._loop.create_future()
        self._queries[reply_type].append(future)
        try:
            await self._transport.send(self._codec.encode(query))
        except BaseException:  # not sent: no reply will come for it
            self._queries[reply_type].remove(future)
            raise
        try:  # a timed-out future stays queued (cancelled): its late answer is still the one it takes
            async with asyncio.timeout_at(None if self.timeout_s is None else began + self.timeout_s):
                return await future
        except TimeoutError:
            raise EngineError("unavailable", f"the engine at {self.endpoint} did not answer a {reply_type.__name__.lower()} "
                                             f"query within {self.timeout_s:.1f} s (timeout_s)") from None

    async def _receive(self) -> None:
        while True:
            for frames in await self._transport.receive():
                self._dispatch(frames)

    def _dispatch(self, frames: list) -> None:
        try:
            message, arrays = self._codec.decode(frames)
        except ProtocolError:
            return  # not ours to answer; the engine only sends valid messages
        if isinstance(message, Welcome):  # the answer to the hello of a new connection
            self._welcomed(message)
            return
        if isinstance(message, Pong):  # the direct link's heartbeat: its arrival was the point
            return
        queries = self._queries.get(type(message))
        if queries is not None:  # one reply per query, in order (its caller may have given up)
            future = queries.pop(0) if queries else None
            if future is not None and not future.done():
                future.set_result(message)
            return
        request_id = getattr(message, "id", None)
        future = self._waiting.get(request_id)
        if future is not None and not future.done():
            future.set_result((message, arrays))
        elif future is not None and future.cancelled():  # given up on in this very turn: still its one reply
            del self._waiting[request_id]
            self._unwanted(request_id, message)
        elif request_id in self._lost_ids:  # e.g. "say hello first" for a request sent as the connection broke
            self._lost_ids.discard(request_id)
        elif request_id in self._cancelled:  # the one reply to a request given up on
            self._cancelled.discard(request_id)
            self._unwanted(request_id, message)
        elif isinstance(message, Error) and request_id is None:
            for waiting in self._waiting.values():  # an error about a message we sent, not a request
                if not waiting.done():
                    waiting.set_result((message, []))
        elif len(self.stray_replies) < 100:
            self.stray_replies.append(repr(message)[:300])

    async def close(self) -> None:
        tasks = [task for task in (self._receiver, self._watcher, self._arena_asked) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in [*self._waiting.values(), *self._queries[Stats], *self._queries[Health]]:
            if not future.done():
                future.set_exception(ConnectionError("the client was closed"))
        if self._transport is not None:
            self._transport.close()
        if self._context is not None:
            self._context.term()
        self._reader.close()
        self._arena.close()
