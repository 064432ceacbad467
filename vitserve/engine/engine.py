"""The engine core: worker processes, the scheduler loop, shared-memory slots and the life of
every request, in the caller's event loop.

    async with Engine(EngineConfig(model="random:qwen3-vl-8b", devices=("cuda:0",))) as engine:
        with await engine.encode([image, video], deadline_ms=200) as result:
            result.items[0].embeddings      # a tensor viewing shared memory

Every accepted request ends exactly once: its future gets the output references, or an
EngineError with a code. A window's slot is held once per request with items in it and is
free again when all of them are released (or failed, or cancelled).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import zmq

from vitserve.ipc.messages import OutputRef, WorkerReady
from vitserve.ipc.outputs import Encoded, encoded_from_refs, ref_array
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabPool, Slot
from vitserve.log_limits import LogLimiter
from vitserve.scheduler import Dispatch, Request, Scheduler, WorkerState, deadline_at
from vitserve.workers import Capacities

from .admission import AdmissionError, AdmittedItem, admit
from .config import EngineConfig
from .errors import EngineError
from .inputs import EngineInputs
from .outputs_layout import agreed_capacities, check_request_fits, output_layout, predictor
from .reports import EngineReports
from .request_ends import RequestEnds
from .restarts import WorkerRestarts
from .windows import WindowTraffic
from .worker_handle import WorkerHandle

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 86_400_000.0  # a day: anything longer is a client bug, not a deadline
_INSTANCES = itertools.count()  # engines made in this process (their slab names differ)


@dataclass(eq=False)
class _Pending:
    items: list[AdmittedItem]
    future: asyncio.Future
    outputs: list[OutputRef | None]
    slots: list[tuple[int, Slot]] = field(default_factory=list)  # (worker, slot) held for this request
    delivered_at: float | None = None  # loop time the result was handed over; its lease runs from here
    input_bytes: int = 0  # of its inputs, counted against max_queued_bytes until they are dropped
    input_region: int | None = None  # where its inputs were copied into the engine's input slab, if they were


class Engine(WindowTraffic, WorkerRestarts, RequestEnds, EngineReports):
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self._instance = next(_INSTANCES)
        self.capacities: Capacities | None = None
        self.ready: WorkerReady | None = None
        self.scheduler: Scheduler | None = None
        self._handles: list[WorkerHandle] = []
        self._pools: dict[int, SlabPool] = {}  # worker -> the pool of its current epoch
        self._retired: dict[tuple[int, int], SlabPool] = {}  # (worker, epoch) of a lost worker -> its pool
        self._epochs: dict[int, int] = {}  # worker -> its current epoch (slabs and socket)
        self._restarting: set[int] = set()
        self._hung: set[int] = set()  # workers whose heartbeat stopped, until they are back
        self._pending: dict[int, _Pending] = {}
        self._windows: dict[int, tuple[Dispatch, Slot, float]] = {}  # window -> (dispatch, slot, loop time sent)
        self._keys = itertools.count(1)
        self._windows_sent = 0
        self._items_sent = 0
        self._worker_ms = 0.0  # summed over completed windows: receipt to reply, in the workers
        self._gpu_busy_ms = 0.0  # summed over completed windows: device time they kept busy (CUDA events)
        self._leases_expired = 0
        self._worker_restarts = 0
        self._windows_retried = 0
        self._worker_hangs = 0
        self._queued_bytes = 0  # inputs of unfinished requests (max_queued_bytes)
        self._internal_errors = 0  # unexpected failures contained to the requests that met them
        self._log_limits = LogLimiter(log)
        self.failure: BaseException | None = None  # why a loop of the engine ended: it no longer serves
        self.stopped = asyncio.Event()  # set when `failure` is (`vitserve serve` exits non-zero then)
        self._tasks: list[asyncio.Task] = []
        self._poke = asyncio.Event()
        self._reader = SlabReader(self._open_slab)
        self.inputs: EngineInputs | None = None  # the input slabs, made by start()
        self.started = False  # start() has finished: workers ready, pools made, loops running
        self._draining = False  # no new requests; those admitted finish
        self._closing = False
        self._context: zmq.Context | None = None
        self._socket_dir: str | None = None

    # -- life cycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        config = self.config
        self.inputs = EngineInputs(self._instance, config.input_slab_size, config.clients.input_arena_bytes,
                                   config.clients.max_input_arenas, self._send_to_worker, self._mapping_workers)
        self._context = zmq.Context()
        self._socket_dir = tempfile.mkdtemp(prefix="vitserve-")
        self._handles = [self._spawn(worker, 0) for worker in range(len(config.devices))]
        self._epochs = dict.fromkeys(range(len(config.devices)), 0)
        try:
            readies = await asyncio.gather(*(h.start(config.startup_timeout_s) for h in self._handles))
            self._setup(readies)
            pools = await asyncio.gather(*(self._new_pool(h, 0) for h in self._handles), return_exceptions=True)
            self._pools.update((w, p) for w, p in enumerate(pools) if isinstance(p, SlabPool))  # closed by close()
            for problem in pools:
                if isinstance(problem, BaseException):
                    raise problem
            for handle in self._handles:
                self.inputs.map_all(handle.worker)
        except BaseException:
            await self.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch_loop(), name="vitserve-dispatch")]
        self._tasks += [loop.create_task(self._receive_loop(h), name=f"vitserve-receive-{h.worker}")
                        for h in self._handles]
        if config.lease_timeout_s is not None:
            self._tasks.append(loop.create_task(self._lease_loop(config.lease_timeout_s), name="vitserve-leases"))
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)
        self.started = True

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop task that fails says why, and every request ends (none may hang)."""
        if task.cancelled() or self._closing or task.exception() is None:
            return  # cancelled at close, or a receive loop whose worker died (handled there)
        log.error("engine task %s ended: %r; failing every request", task.get_name(), task.exception(),
                  exc_info=task.exception())
        self._closing = True
        self.failure = task.exception()
        self.stopped.set()
        for key in list(self._pending):
            self._fail(key, "worker_failed", f"the engine failed internally ({task.exception()!r})")

    def _setup(self, readies: Sequence[WorkerReady]) -> None:
        self.ready = readies[0]
        self.capacities = agreed_capacities(readies)
        self.layout = output_layout(self.ready, self.capacities, self.config.output_windows,
                                    self.config.item_token_limit)
        states = []
        for ready in readies:
            states.append(WorkerState(ready.worker, predictor(ready, self.capacities),
                                      free_rows=self.layout.slots * self.layout.slot_rows,
                                      row_granularity=self.layout.slot_rows))
        self.scheduler = Scheduler(self.config.scheduler, self.capacities, states)
        if self.config.window_timeout_s is not None:  # half: predictions can be off, the watchdog must not fire
            self.scheduler.max_item_ms = self.config.window_timeout_s * 1e3 / 2

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop admitting (new requests get `shutting_down`) and let every admitted request finish,
        for up to `timeout_s` (default: the config's drain_timeout_s); then fail the rest with
        `shutting_down`. Returns how many failed. Results already delivered stay leased."""
        self._draining = True
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        running = [p.future for p in self._pending.values() if not p.future.done()]
        if running and timeout_s > 0 and not self._closing:
            await asyncio.wait(running, timeout=timeout_s)
        unfinished = [key for key, p in self._pending.items() if not p.future.done()]
        for key in unfinished:
            self._fail(key, "shutting_down", f"the engine shut down before the request finished "
                                             f"(drain_timeout_s={timeout_s:g})")
        if unfinished:
            log.warning("%d requests did not finish within the drain timeout of %g s", len(unfinished), timeout_s)
        return len(unfinished)

    async def close(self) -> None:
        """Drain (see `drain`), stop the workers, remove every slab."""
        if self._tasks:
            await self.drain()
        self._closing = True
        for key in list(self._pending):
            self._fail(key, "shutting_down", "the engine is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in self._handles), return_exceptions=True)
        for pool in self._all_pools():
            pool.close()
        if self.inputs is not None:
            self.inputs.close()
        self._reader.close()
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- requests ------------------------------------------------------------------------------
    async def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0) -> Encoded:
        """Encode images (uint8 H×W×3), videos (uint8 T×H×W×3) or (pixel_values, grid_thw) pairs.

        The result's tensors view shared memory until `release()` (or the `with` block's end, or
        garbage collection); raises EngineError with a code when the request fails."""
        key, refs = await self.run(self.admit(items), deadline_ms, priority)
        loop = asyncio.get_running_loop()

        def release() -> None:  # may run in any thread, even inside engine code (garbage collection): defer
            try:
                loop.call_soon_threadsafe(self.release, key)
            except RuntimeError:
                pass  # the loop is closed: the engine and its slabs are gone already

        return encoded_from_refs(refs, self._reader, release, self.config.output_device)

    def admit(self, items: Sequence[Any], slabs: Sequence[tuple[str, int]] | None = None) -> list[AdmittedItem]:
        """Check and plan each item; `slabs`: for each, the input slab and offset its array lies at
        (an arena's, as the frontend found it), or ("", -1) when it is to be copied into one."""
        if not items:
            raise EngineError("invalid_input", "a request needs at least one item")
        try:
            admitted = [admit(item, self.config.preprocess, self.config.item_token_limit, f"item {i}")
                        for i, item in enumerate(items)]
        except AdmissionError as err:
            raise EngineError(err.code, err.message) from None
        if slabs is not None:
            admitted = [item if not slab else replace(item, slab=slab, offset=offset)
                        for item, (slab, offset) in zip(admitted, slabs)]
        size = sum(item.array.nbytes for item in admitted)
        if size > self.config.max_request_bytes:
            raise EngineError("too_large", f"the request's inputs take {size} bytes, over the engine's "
                                           f"max_request_bytes={self.config.max_request_bytes}: split it")
        return admitted

    async def run(self, items: list[AdmittedItem], deadline_ms: float | None,
                  priority: int) -> tuple[int, list[OutputRef]]:
        """Queue admitted items and wait for their output references (they stay leased until `release`)."""
        key, future = self.submit(items, deadline_ms, priority)
        try:
            return key, await future
        except asyncio.CancelledError:
            self.release(key)  # cancels it if it is still running; frees its slots if it had finished
            raise

    def submit(self, items: list[AdmittedItem], deadline_ms: float | None, priority: int,
               owner: int = 0) -> tuple[int, asyncio.Future]:
        """Queue admitted items; the future gets their output references or an EngineError.
        `owner` names the client: clients take fair turns (a frontend passes its connection's number)."""
        if self.failure is not None:
            raise EngineError("worker_failed", f"the engine stopped after an internal failure ({self.failure!r}): "
                                               f"start a new one")
        if self._closing or self._draining or self.scheduler is None:
            raise EngineError("shutting_down", "the engine is shutting down or not running")
        if not self.workers_ready() and not self._restarting:
            raise EngineError("worker_failed", "no worker is running")
        if deadline_ms is not None and not 0 <= deadline_ms <= MAX_DEADLINE_MS:
            raise EngineError("invalid_input", f"deadline_ms must be from 0 to {MAX_DEADLINE_MS:.0f} (a day), or "
                                               f"None for no deadline; got {deadline_ms!r}")
        check_request_fits([(i.tokens, i.sequences) for i in items], self.capacities, self.layout,
                           self.config.output_windows)
        loop = asyncio.get_running_loop()
        now = loop.time()
        size = sum(item.array.nbytes for item in items)
        if self._queued_bytes + size > self.config.max_queued_bytes:
            raise EngineError("overloaded", f"the inputs of unfinished requests take {self._queued_bytes} bytes; "
                                            f"{size} more would pass max_queued_bytes={self.config.max_queued_bytes}",
                              self.scheduler.drain_ms(now))
        items, region = self.inputs.place(items)
        key = next(self._keys)
        request = Request(key, priority, deadline_at(now, deadline_ms), now, [(i.tokens, i.sequences) for i in items],
                          owner)
        pending = _Pending(items, loop.create_future(), [None] * len(items), input_bytes=size, input_region=region)
        self._queued_bytes += size
        self._pending[key] = pending
        try:
            failure = self.scheduler.submit(request, now)
        except Exception as err:  # contained to this request: nothing of it stays queued or pending
            self._internal_errors += 1
            self._log_limits.error("submit", "queueing request %d failed: %r", key, err, exc_info=True)
            self._fail(key, "worker_failed", f"the engine failed to queue the request ({err!r})")
            return key, pending.future
        if failure is not None:
            self._fail(key, failure.code, failure.message, failure.retry_after_ms)
        else:
            self._poke.set()
        return key, pending.future

    def _send_to_worker(self, worker: int, message) -> bool:
        return self._handles[worker].send_now(message, [])

    def _mapping_workers(self) -> list[int]:
        """Workers that map input slabs now: started, and not lost (one starting maps them all when ready)."""
        return [h.worker for h in self._handles if h.ready is not None and self.scheduler is not None
                and self.scheduler.workers[h.worker].ready]

    def read(self, ref: OutputRef) -> np.ndarray:
        """A read-only view of one item's output rows (rows, 1 + deepstack, out_hidden)."""
        return ref_array(ref, self._reader)
