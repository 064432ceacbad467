"""Clients of a running engine: `AsyncClient` (asyncio) and `Client`, its thin sync wrapper.

    with Client("ipc:///tmp/vitserve.sock") as client:
        with client.encode([image]) as result:
            result.items[0].embeddings          # (rows, out_hidden), viewing shared memory

On ipc:// the outputs are read in place from the engine's shared memory; on tcp:// (another
host) they come inline in the reply. Results are released with `release()`, at the end of
their `with` block, or when garbage-collected; a failed request raises EngineError with
its code (`overloaded` carries a retry hint).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, Sequence

import numpy as np
import torch
import zmq

from vitserve.engine.errors import EngineError
from vitserve.ipc.burst import BurstSocket
from vitserve.ipc.codec import ProtocolError, array_ref, client_codec
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, Cancel, Encode, Error, Health, HealthQuery, Hello, ImageItem, PatchItem, Release, Result, Stats,
    StatsQuery, VideoItem, Welcome,
)
from vitserve.ipc.outputs import Encoded, encoded_from_refs
from vitserve.ipc.peers import own_identity
from vitserve.ipc.slab_maps import SlabReader

CONNECT_TIMEOUT_S = 30.0


class AsyncClient:
    def __init__(self, endpoint: str, *, inline: bool | None = None, name: str = ""):
        self.endpoint = endpoint
        self.inline = endpoint.startswith("tcp://") if inline is None else inline
        self.name = name
        self.welcome: Welcome | None = None
        self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        self._socket = BurstSocket(socket)
        self._codec = client_codec()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._cancelled: set[int] = set()  # requests given up on whose result may still arrive
        self.stray_replies: list[str] = []  # replies for no request awaiting one (a second reply would be one)
        self._reader = SlabReader()
        self._releases: list[int] = []  # gathered during one loop turn, sent as one message
        # stats and health queries in flight, by reply type; each type is answered in order
        self._queries: dict[type, list[asyncio.Future]] = {Stats: [], Health: []}
        self._receiver: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> Welcome:
        """Connect and shake hands (protocol version); raises ConnectionError when no engine answers."""
        self._loop = asyncio.get_running_loop()
        self._socket.socket.connect(self.endpoint)
        pid, pid_start = own_identity()
        await self._socket.send(self._codec.encode(Hello(PROTOCOL_VERSION, self.name, pid, pid_start)))
        try:
            reply = await self._socket.receive_one(timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no vitserve engine answered at {self.endpoint} within {timeout_s:.0f} s") from None
        message, _ = self._codec.decode(reply)
        match message:
            case Welcome():
                self.welcome = message
            case Error(message=text):
                raise ConnectionError(f"the engine at {self.endpoint} refused the connection: {text}")
        self._receiver = asyncio.ensure_future(self._receive())
        return self.welcome

    async def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0) -> Encoded:
        """Images (uint8 H×W×3), videos (uint8 T×H×W×3) or (pixel_values, grid_thw) pairs."""
        request_id = next(self._ids)
        wire_items, frames = [], []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2:
                values, grid = item
                array = np.ascontiguousarray(values.numpy() if isinstance(values, torch.Tensor) else values)
                grid = tuple(int(x) for x in np.asarray(grid).reshape(-1))
                wire_items.append(PatchItem(array_ref(array, len(frames)), grid))
            else:
                array = np.ascontiguousarray(item.numpy() if isinstance(item, torch.Tensor) else item)
                kind = VideoItem if array.ndim == 4 else ImageItem
                wire_items.append(kind(array_ref(array, len(frames))))
            frames.append(array)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        message = Encode(request_id, wire_items, deadline_ms, priority, self.inline)
        try:
            await self._socket.send(self._codec.encode(message, frames))
        except BaseException:  # not sent: nothing to cancel at the engine
            self._waiting.pop(request_id, None)
            raise
        try:
            reply, reply_frames = await future
        except asyncio.CancelledError:  # the caller gave up: the engine drops the request (or its result)
            if future.done() and not future.cancelled():  # the reply came in the same turn as the cancellation
                self._unwanted(request_id, future.result()[0])
            elif request_id in self._waiting:  # no reply yet (`_dispatch` takes one that comes as we unwind)
                self._cancelled.add(request_id)
                self._send_control(Cancel(request_id))
            raise
        finally:
            self._waiting.pop(request_id, None)
        match reply:
            case Error(code=code, message=text, retry_after_ms=retry):
                raise EngineError(code, text, retry)
            case Result(outputs=refs):
                release = None if self.inline else self._releaser(request_id)
                return encoded_from_refs(refs, self._reader, release, frames=reply_frames)

    async def stats(self) -> dict[str, float]:
        """The engine's counters: requests, results, errors, queued items, open requests, leased slots..."""
        return dict((await self._query(StatsQuery(), Stats)).values)

    async def health(self) -> Health:
        """Whether the engine serves now (`ready`: admitting, with a worker up), its workers, their pids."""
        return await self._query(HealthQuery(), Health)

    async def _query(self, query: StatsQuery | HealthQuery, reply_type: type):
        future = self._loop.create_future()
        self._queries[reply_type].append(future)
        try:
            await self._socket.send(self._codec.encode(query))
        except BaseException:  # not sent: no reply will come for it
            self._queries[reply_type].remove(future)
            raise
        return await future

    def _releaser(self, request_id: int):
        loop = self._loop

        def release() -> None:  # may run in any thread, from garbage collection
            try:
                loop.call_soon_threadsafe(self._send_release, request_id)
            except RuntimeError:
                pass  # the client's loop is closed; the engine frees the slots when the client goes

        return release

    def _send_release(self, request_id: int) -> None:
        if not self._releases:
            self._loop.call_soon(self._flush_releases)
        self._releases.append(request_id)

    def _flush_releases(self) -> None:
        ids, self._releases = self._releases, []
        self._send_control(Release(ids))

    def _send_control(self, message: Cancel | Release) -> None:
        """Small messages that must not wait: queued by ZeroMQ (they are lost only with the socket)."""
        if not self._socket.socket.closed and not self._socket.send_now(self._codec.encode(message)):
            asyncio.ensure_future(self._socket.send(self._codec.encode(message)))

    async def _receive(self) -> None:
        while True:
            for frames in await self._socket.receive():
                self._dispatch(frames)

    def _dispatch(self, frames: list) -> None:
        try:
            message, arrays = self._codec.decode(frames)
        except ProtocolError:
            return  # not ours to answer; the engine only sends valid messages
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
        elif request_id in self._cancelled:  # the one reply to a request given up on
            self._cancelled.discard(request_id)
            self._unwanted(request_id, message)
        elif isinstance(message, Error) and request_id is None:
            for waiting in self._waiting.values():  # an error about a message we sent, not a request
                if not waiting.done():
                    waiting.set_result((message, []))
        elif len(self.stray_replies) < 100:
            self.stray_replies.append(repr(message)[:300])

    def _unwanted(self, request_id: int, reply: Result | Error) -> None:
        """The reply to a request given up on: a result that finished before the cancel is released."""
        if isinstance(reply, Result) and not self.inline:
            self._send_release(request_id)

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for future in [*self._waiting.values(), *self._queries[Stats], *self._queries[Health]]:
            if not future.done():
                future.set_exception(ConnectionError("the client was closed"))
        self._socket.close()
        self._context.term()
        self._reader.close()


class Client:
    """The sync client: an AsyncClient on a private event loop in a background thread."""

    def __init__(self, endpoint: str, *, inline: bool | None = None, name: str = ""):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vitserve-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(endpoint, inline=inline, name=name)
        self.welcome = self._call(self._client.connect())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0) -> Encoded:
        return self._call(self._client.encode(items, deadline_ms, priority))

    def stats(self) -> dict[str, float]:
        return self._call(self._client.stats())

    def health(self) -> Health:
        return self._call(self._client.health())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
