"""The ZeroMQ frontend: a ROUTER socket on ipc:// or tcp:// in front of an Engine.

Each client connection is a ROUTER identity. Messages are decoded with one typed decoder;
anything that is not a valid message gets an `error` reply with a code, and the connection
stays usable. An encode request is admitted and queued at once; the reply goes out from its
future's callback, so a slow window never blocks other clients. Outputs stay leased until the
client sends `release` (inline outputs are copied into the reply and released at once), or
until the client's process is seen to have exited (local clients that named their process).
"""

from __future__ import annotations

import asyncio
import logging
import math
from functools import partial

import numpy as np
import zmq

from vitserve.ipc.burst import BurstSocket
from vitserve.ipc.peers import process_start, still_running
from vitserve.ipc.codec import ProtocolError, check_all_frames_used, frame_array, server_codec
from vitserve.ipc.messages import (
    PROTOCOL_VERSION, Cancel, Encode, Error, HealthQuery, Hello, ImageItem, OutputRef, PatchItem, Release,
    Result, Stats, StatsQuery, VideoItem, Welcome,
)
from .engine import Engine
from .errors import EngineError

log = logging.getLogger(__name__)

CLIENT_CHECK_S = 1.0  # how often client processes and reclaimed leases are checked
MAX_HEADER_BYTES = 1 << 20  # a message header (the frames' descriptions) is far smaller
CLOSE_LINGER_MS = 2000  # at shutdown, replies already queued get this long to reach their clients
UNREAD_REPLIES_PER_CLIENT = 1000  # ZeroMQ's default high-water mark, made explicit: replies past it are dropped


class Frontend:
    def __init__(self, engine: Engine, endpoint: str):
        self.engine = engine
        self.endpoint = endpoint
        self._codec = server_codec()
        self._active: dict[tuple[bytes, int], int] = {}  # (client, request id) -> engine key
        self._processes: dict[bytes, tuple[int, int]] = {}  # client -> (pid, start time), where verified
        self._context = zmq.Context()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        # A reply that cannot go out (its client is gone, or has this many unread replies) raises
        # instead of vanishing: it is counted, and a result's rows are freed at once.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.SNDHWM, UNREAD_REPLIES_PER_CLIENT)
        # A frame larger than any admissible request is not even read: its sender is disconnected.
        socket.setsockopt(zmq.MAXMSGSIZE, engine.config.max_request_bytes + MAX_HEADER_BYTES)
        socket.bind(endpoint)
        self.socket = BurstSocket(socket)
        self.counters = {"requests": 0, "results": 0, "errors": 0, "replies_dropped": 0}

    async def serve(self) -> None:
        """Answer messages until cancelled."""
        watcher = asyncio.ensure_future(self._watch_clients())
        try:
            while True:
                for identity, *frames in await self.socket.receive():
                    try:
                        self._handle(identity.bytes, frames)
                    except Exception as err:  # one message must never stop the server
                        log.exception("a message could not be handled")
                        self._send(identity.bytes, Error(None, "protocol", f"the message could not be handled: {err}"))
        finally:
            watcher.cancel()
            self.socket.close(CLOSE_LINGER_MS)
            self._context.term()

    def _handle(self, client: bytes, frames: list) -> None:
        try:
            message, arrays = self._codec.decode(frames)
        except ProtocolError as err:
            self._send(client, Error(None, err.code, str(err)))
            return
        match message:
            case Hello(version=version, pid=pid, pid_start=pid_start):
                if pid > 0 and pid_start > 0 and process_start(pid) == pid_start:
                    self._processes[client] = (pid, pid_start)
                if version != PROTOCOL_VERSION:
                    self._send(client, Error(None, "protocol", f"protocol version {version} is not supported; "
                                                               f"this engine speaks version {PROTOCOL_VERSION}"))
                else:
                    ready = self.engine.ready
                    self._send(client, Welcome(PROTOCOL_VERSION, self.engine.config.model, ready.out_hidden,
                                               ready.num_deepstack, ready.dtype, self.engine.capacities.budgets))
            case Encode():
                self._encode(client, message, arrays)
            case Cancel(id=request_id):
                key = self._active.get((client, request_id))
                if key is not None:
                    self.engine.cancel(key)
            case Release(ids=request_ids):
                for request_id in request_ids:
                    key = self._active.pop((client, request_id), None)
                    if key is not None and self.engine.is_open(key):
                        self.engine.release(key)
                    else:
                        self._error(client, request_id, "invalid_input",
                                    f"request {request_id} holds nothing for this client to release: it was never "
                                    f"sent on this connection, was already released, ended with an error, or its "
                                    f"result outlived lease_timeout_s")
            case StatsQuery():
                self._send(client, Stats({name: float(value) for name, value in self.counters.items()}
                                         | self.engine.stats()))
            case HealthQuery():
                self._send(client, self.engine.health())

    def _encode(self, client: bytes, message: Encode, arrays: list[memoryview]) -> None:
        request = (client, message.id)
        self.counters["requests"] += 1
        if request in self._active:
            self._error(client, message.id, "invalid_input", f"request id {message.id} is already in use by this "
                                                             f"client: use a new id, or release the old request")
            return
        try:
            admitted = self.engine.admit(_items(message, arrays))
            key, future = self.engine.submit(admitted, message.deadline_ms, message.priority)
        except ProtocolError as err:
            self._error(client, message.id, err.code, str(err))
            return
        except EngineError as err:
            self._error(client, message.id, err.code, err.message, err.retry_after_ms)
            return
        except Exception as err:  # never leave a request unanswered
            log.exception("request %d failed unexpectedly", message.id)
            self._error(client, message.id, "invalid_input", f"the request could not be processed: {err}")
            return
        self._active[request] = key
        future.add_done_callback(partial(self._finish, client, message, key))

    def _finish(self, client: bytes, message: Encode, key: int, future: asyncio.Future) -> None:
        """The request ended: its result or error goes to the client."""
        request = (client, message.id)
        if future.cancelled():  # only at shutdown
            self._active.pop(request, None)
            return
        error = future.exception()
        if error is not None:
            self._active.pop(request, None)
            if isinstance(error, EngineError):
                self._error(client, message.id, error.code, error.message, error.retry_after_ms)
            else:
                self._error(client, message.id, "worker_failed", f"the request failed: {error!r}")
            return
        refs = future.result()
        self.counters["results"] += 1
        if not message.inline:
            if not self._send(client, Result(message.id, refs)):  # never to be read: free its rows now
                self._active.pop(request, None)
                self.engine.release(key)
            return
        # Inline (remote clients): copy the rows into the reply, then the slots are free again.
        frames = [np.array(self.engine.read(ref)) for ref in refs]
        inline = [OutputRef(ref.shape, ref.dtype, frame=i) for i, ref in enumerate(refs)]
        self._active.pop(request, None)
        self.engine.release(key)
        self._send(client, Result(message.id, inline), frames)

    async def _watch_clients(self) -> None:
        """Release what clients whose process exited still hold (and cancel what they still wait for)."""
        while True:
            await asyncio.sleep(CLIENT_CHECK_S)
            try:
                self._release_exited_clients()
                self._forget_reclaimed()
            except Exception:  # the watch must go on: it is what frees an exited client's slots
                log.exception("checking client processes failed")

    def _forget_reclaimed(self) -> None:
        """Requests the engine no longer holds (leases that expired) are no longer the clients'."""
        closed = [request for request, key in self._active.items() if not self.engine.is_open(key)]
        for request in closed:
            del self._active[request]

    def _release_exited_clients(self) -> None:
        exited = {process for process in set(self._processes.values()) if not still_running(*process)}
        if not exited:
            return
        gone = {client for client, process in self._processes.items() if process in exited}
        for request in [request for request in self._active if request[0] in gone]:
            self.engine.release(self._active.pop(request))
        for client in gone:
            del self._processes[client]
        log.info("released the requests of %d connection(s) of %d exited process(es)", len(gone), len(exited))

    def _error(self, client: bytes, request_id: int | None, code: str, text: str, retry: float | None = None) -> None:
        self.counters["errors"] += 1
        self._send(client, Error(request_id, code, text, retry))

    def _send(self, client: bytes, message, frames: list | None = None) -> bool:
        """Whether the reply went out; one that cannot (a vanished client, or one not reading) is counted."""
        if self.socket.socket.closed:
            return False  # the server stopped: requests still ending (failed by the engine's close) go unanswered
        try:
            sent = self.socket.send_now([client, *self._codec.encode(message, frames or [])])
        except zmq.ZMQError:  # EHOSTUNREACH: the client's connection is gone
            sent = False
        if not sent:
            self.counters["replies_dropped"] += 1
            dropped = self.counters["replies_dropped"]
            if math.log10(dropped).is_integer():  # 1, 10, 100...: a trend, not a line per reply
                log.warning("%d replies could not be delivered so far (clients gone, or not reading theirs)",
                            dropped)
        return sent


def _items(message: Encode, arrays: list[memoryview]) -> list:
    """The request's items as arrays over the received frames (no copy)."""
    refs, items = [], []
    for item in message.items:
        match item:
            case ImageItem(pixels=ref) | VideoItem(frames=ref):
                refs.append(ref)
                items.append(frame_array(ref, arrays, message.id))
            case PatchItem(pixel_values=ref, grid_thw=grid):
                refs.append(ref)
                items.append((frame_array(ref, arrays, message.id), grid))
    check_all_frames_used(refs, arrays, message.id)
    for index, (item, sent) in enumerate(zip(items, message.items)):
        rank = {ImageItem: 3, VideoItem: 4}.get(type(sent))
        if rank is not None and (item.dtype != np.uint8 or item.ndim != rank):
            shape = "H×W×3" if rank == 3 else "T×H×W×3"
            raise ProtocolError(f"item {index}: {type(sent).__name__} must be uint8 {shape}, got {item.dtype} "
                                f"with shape {list(item.shape)}", "invalid_input", message.id)
    return items
