"""A client's requests at the frontend: admission within the client's limits (limits.py), the
reply when a request ends, and releases, which also acknowledge inline results.

A mixin of `Frontend` (frontend.py), which owns the engine, the limits and the connections.
"""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import Callable

import numpy as np

from vitserve.ipc.codec import ProtocolError, check_all_frames_used, check_ref, frame_array
from vitserve.ipc.messages import ArrayRef, Encode, Found, ImageItem, Lookup, OutputRef, PatchItem, Result, VideoItem
from vitserve.ipc.slabs import SlabError, numpy_dtype

from .admission import AdmittedItem
from .connections import Connection
from .errors import EngineError


class ClientRequests:
    def _encode(self, connection: Connection, message: Encode, arrays: list[memoryview]) -> None:
        self.counters["requests"] += 1
        if not self._new_id(connection, message.id):
            return
        try:
            self._check_request(connection, message)
            items = _items(message, arrays, partial(self._arena_array, connection, request_id=message.id))
            slabs = [(connection.arena, ref.offset) if ref.offset >= 0 else ("", -1) for ref in map(_ref, message.items)]
            admitted = self.engine.admit(items, slabs)
            usage = self._check_share(connection, admitted)
            key, future = self.engine.submit(admitted, message.deadline_ms, message.priority, connection.serial,
                                             message.keep, message.keep_s)
        except ProtocolError as err:
            self._error(connection, message.id, err.code, str(err))
            return
        except EngineError as err:
            self._error(connection, message.id, err.code, err.message, err.retry_after_ms)
            return
        except Exception as err:  # never leave a request unanswered
            self._log_limits.error("encode", "request %d failed unexpectedly", message.id, exc_info=True)
            self._error(connection, message.id, "invalid_input", f"the request could not be processed: {err}")
            return
        connection.requests[message.id] = key
        connection.queued[:] = [held + new for held, new in zip(connection.queued, usage)]
        self._queued_items += usage[0]
        future.add_done_callback(partial(self._finish, connection, message, key, usage))

    def _new_id(self, connection: Connection, request_id: int) -> bool:
        """Whether `request_id` is free on this connection; if not, the request is refused."""
        if request_id in connection.requests or request_id in connection.inline:
            self._error(connection, request_id, "invalid_input", f"request id {request_id} is already in use by this "
                                                                 f"client: use a new id, or release the old request")
            return False
        return True

    def _check_request(self, connection: Connection, message: Encode) -> None:
        low, high = connection.priorities or self.limits.priorities
        if not low <= message.priority <= high:
            whose = "this client key's range" if connection.priorities else "the engine's range"
            setting = "its certificate's priorities" if connection.priorities else "priorities"
            raise EngineError("invalid_input", f"priority {message.priority} is outside {whose} {low}..{high} "
                                               f"({setting})")
        self._check_open(connection)

    def _check_open(self, connection: Connection) -> None:
        open_requests = len(connection.requests) + len(connection.inline)
        if open_requests >= self.limits.max_requests:
            raise EngineError("overloaded", f"this connection has {open_requests} requests unfinished or holding "
                                            f"results (max_requests={self.limits.max_requests}): release results "
                                            f"or wait for replies", 100.0)

    def _check_share(self, connection: Connection, admitted: list[AdmittedItem]) -> tuple[int, int, int]:
        """The request's (items, tokens, bytes), once it fits the client's share of the queue and of
        the output memory: `too_large` when it never can, `overloaded` while the client's other
        requests leave it no room."""
        engine, share = self.engine, self.limits.queue_share
        usage = (len(admitted), sum(item.tokens for item in admitted), sum(item.array.nbytes for item in admitted))
        queue = engine.config.scheduler
        bounds = (queue.max_queued_items, queue.max_queued_tokens, engine.config.max_queued_bytes)
        for name, held, new, bound in zip(("items", "tokens", "input bytes"), connection.queued, usage, bounds):
            allowed = int(share * bound)
            if new > allowed:
                raise EngineError("too_large", f"the request has {new} {name}, more than one client's share of the "
                                               f"queue ({allowed}: queue_share={share:g} of {bound}): split it")
            if held + new > allowed:
                raise EngineError("overloaded", f"this client's unfinished requests hold {held} of its {allowed} "
                                                f"{name} (queue_share={share:g}): wait for their replies",
                                  engine.scheduler.drain_ms(asyncio.get_running_loop().time()))
        if self._queued_items > connection.queued[0]:  # others wait: this client's results keep to their share
            layout, share = engine.layout, self.limits.output_share
            allowed = int(share * layout.slots * layout.slot_rows)
            held = sum(engine.held_rows(key) for key in connection.requests.values())
            if held >= allowed:
                raise EngineError("overloaded", f"this client's results hold {held} output rows, its share while "
                                                f"others wait is {allowed} (output_share={share:g}): release results "
                                                f"sooner", 100.0)
        return usage

    def _finish(self, connection: Connection, message: Encode, key: int, usage: tuple[int, int, int],
                future: asyncio.Future) -> None:
        """The request ended: its result or error goes to the client."""
        connection.queued[:] = [held - used for held, used in zip(connection.queued, usage)]
        self._queued_items -= usage[0]
        if future.cancelled():  # only at shutdown
            _forget_id(connection, message.id, key)
            return
        error = future.exception()
        if error is None and not self.engine.is_open(key):  # released (or its connection closed) before this turn
            error = EngineError("cancelled", "released by the client before its result was sent")
        if error is not None:
            _forget_id(connection, message.id, key)
            if isinstance(error, EngineError):
                self._error(connection, message.id, error.code, error.message, error.retry_after_ms)
            else:
                self._error(connection, message.id, "worker_failed", f"the request failed: {error!r}")
            return
        self.counters["results"] += 1
        self._deliver(connection, message.id, key, future.result(), message.inline, Result)

    def _lookup(self, connection: Connection, message: Lookup) -> None:
        """Kept items by name, delivered (and held) as a result is."""
        self.counters["requests"] += 1
        if not self._new_id(connection, message.id):
            return
        try:
            self._check_open(connection)
            key, refs = self.engine.lookup_refs(message.names)
        except EngineError as err:
            self._error(connection, message.id, err.code, err.message, err.retry_after_ms)
            return
        except Exception as err:  # never leave a request unanswered
            self._log_limits.error("lookup", "lookup %d failed unexpectedly", message.id, exc_info=True)
            self._error(connection, message.id, "invalid_input", f"the lookup could not be processed: {err}")
            return
        connection.requests[message.id] = key
        self.counters["results"] += 1
        self._deliver(connection, message.id, key, refs, message.inline, Found)

    def _forget(self, names: list[str]) -> None:
        try:
            self.engine.forget(names)
        except Exception:  # contained: a forget has no reply, and the connection goes on
            self._log_limits.error("forget", "forgetting %d names failed unexpectedly", len(names), exc_info=True)

    def _deliver(self, connection: Connection, request_id: int, key: int, refs: list[OutputRef | None], inline: bool,
                 reply: type[Result] | type[Found]) -> None:
        """Output references to the client, held until it releases `request_id`; or, inline (remote
        clients), the rows copied into the reply and the slots free again, the bytes counted against
        the client until it releases the reply (it has read them)."""
        if not inline:
            if not self._send(connection, reply(request_id, refs)):  # never to be read: free its rows now
                _forget_id(connection, request_id, key)
                self.engine.release(key)
            return
        _forget_id(connection, request_id, key)
        found = [ref for ref in refs if ref is not None]
        size = sum(math.prod(ref.shape) * numpy_dtype(ref.dtype).itemsize for ref in found)
        if connection.inline_bytes + size > self.limits.max_inline_bytes:
            self.engine.release(key)
            self._error(connection, request_id, "overloaded", f"this client has {connection.inline_bytes} bytes of "
                        f"inline results it has not released (max_inline_bytes={self.limits.max_inline_bytes}): "
                        f"read and release them", 100.0)
            return
        frames = [np.array(self.engine.read(ref)) for ref in found]
        frame_of = iter(range(len(found)))
        copies = [None if ref is None else OutputRef(ref.shape, ref.dtype, ref.kind, ref.grid, frame=next(frame_of))
                  for ref in refs]
        self.engine.release(key)
        if self._send(connection, reply(request_id, copies), frames):
            connection.inline[request_id] = size
            connection.inline_bytes += size

    def _release(self, connection: Connection, request_ids: list[int]) -> None:
        unknown = []
        for request_id in request_ids:
            size = connection.inline.pop(request_id, None)
            if size is not None:
                connection.inline_bytes -= size
                continue
            key = connection.requests.get(request_id)
            if key is None or not self.engine.is_open(key):
                connection.requests.pop(request_id, None)
                unknown.append(request_id)
            elif not self.engine.cancel(key):  # a result: its rows are free again
                del connection.requests[request_id]
                self.engine.release(key)
            # (a request still running is cancelled: its id stays in use until its error goes out)
        if unknown:  # one reply per message, however many ids: a long list cannot make long work
            more = f" (and {len(unknown) - 1} more ids)" if len(unknown) > 1 else ""
            self._error(connection, unknown[0], "invalid_input",
                        f"request {unknown[0]}{more} holds nothing for this client to release: it was never sent on "
                        f"this connection, was already released, ended with an error, or its result outlived "
                        f"lease_timeout_s")


    def _arena_array(self, connection: Connection, ref: ArrayRef, *, request_id: int) -> np.ndarray:
        if ref.frame != -1:
            raise ProtocolError(f"an array at arena offset {ref.offset} names frame {ref.frame} too: give one "
                                f"(frame -1 for the arena)", "invalid_input", request_id)
        check_ref(ref, request_id)
        try:
            return self.engine.inputs.arena_array(connection.arena, ref.offset, ref.dtype, tuple(ref.shape))
        except SlabError as err:
            raise ProtocolError(f"array at arena offset {ref.offset}: {err}", "invalid_input", request_id) from None


def _forget_id(connection: Connection, request_id: int, key: int) -> None:
    """The connection no longer holds request `key` under `request_id`. The id may name another
    request by now (a client that reused it after a release or a cancel, before this one's reply
    went out): that one stays the client's, to answer and release."""
    if connection.requests.get(request_id) == key:
        del connection.requests[request_id]


def _ref(item: ImageItem | VideoItem | PatchItem) -> ArrayRef:
    return item.pixel_values if isinstance(item, PatchItem) else item.frames if isinstance(item, VideoItem) else item.pixels


def _items(message: Encode, arrays: list[memoryview], in_arena: Callable[[ArrayRef], np.ndarray] | None = None) -> list:
    """The request's items as arrays over the received frames, or over the sender's input arena
    (`in_arena(ref)`, for references with an offset), without a copy."""
    refs, items = [], []
    for item in message.items:
        ref = _ref(item)
        if ref.offset >= 0 and in_arena is not None:
            array = in_arena(ref)
        else:
            refs.append(ref)
            array = frame_array(ref, arrays, message.id)
        items.append((array, item.grid_thw) if isinstance(item, PatchItem) else array)
    check_all_frames_used(refs, arrays, message.id)
    for index, (item, sent) in enumerate(zip(items, message.items)):
        rank = {ImageItem: 3, VideoItem: 4}.get(type(sent))
        if rank is not None and (item.dtype != np.uint8 or item.ndim != rank):
            shape = "H×W×3" if rank == 3 else "T×H×W×3"
            raise ProtocolError(f"item {index}: {type(sent).__name__} must be uint8 {shape}, got {item.dtype} "
                                f"with shape {list(item.shape)}", "invalid_input", message.id)
    return items
