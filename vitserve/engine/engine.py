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
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

from vitserve.ipc.messages import OutputRef, WorkerReady
from vitserve.ipc.outputs import Encoded, encoded_from_refs, ref_array
from vitserve.ipc.slab_maps import SlabReader, remove_stale_slabs
from vitserve.ipc.slabs import SlabPool, Slot
from vitserve.scheduler import Dispatch, Request, Scheduler, WorkerState, deadline_at
from vitserve.workers import Capacities
from vitserve.workers.process import WorkerSpec

from .admission import AdmissionError, AdmittedItem, admit
from .config import EngineConfig
from .errors import EngineError
from .outputs_layout import agreed_capacities, output_layout, predictor
from .windows import WindowTraffic
from .worker_handle import WorkerHandle

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 86_400_000.0  # a day: anything longer is a client bug, not a deadline
LEASE_CHECK_S = 1.0  # how often unreleased results are checked against the lease timeout


@dataclass(eq=False)
class _Pending:
    items: list[AdmittedItem]
    future: asyncio.Future
    outputs: list[OutputRef | None]
    slots: list[tuple[int, Slot]] = field(default_factory=list)  # (worker, slot) held for this request
    delivered_at: float | None = None  # loop time the result was handed over; its lease runs from here


class Engine(WindowTraffic):
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.capacities: Capacities | None = None
        self.ready: WorkerReady | None = None
        self.scheduler: Scheduler | None = None
        self._handles: list[WorkerHandle] = []
        self._pools: dict[int, SlabPool] = {}
        self._pending: dict[int, _Pending] = {}
        self._windows: dict[int, tuple[Dispatch, Slot]] = {}
        self._keys = itertools.count(1)
        self._windows_sent = 0
        self._items_sent = 0
        self._worker_ms = 0.0  # summed over completed windows: receipt to reply, in the workers
        self._leases_expired = 0
        self._tasks: list[asyncio.Task] = []
        self._poke = asyncio.Event()
        self._reader = SlabReader()
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
        removed = remove_stale_slabs()
        if removed:
            log.warning("removed %d shared-memory slabs left by a crashed engine", len(removed))
        config = self.config
        self._context = zmq.Context()
        self._socket_dir = tempfile.mkdtemp(prefix="vitserve-")
        for worker, device in enumerate(config.devices):
            spec = WorkerSpec(worker=worker, endpoint=f"ipc://{self._socket_dir}/worker-{worker}", model=config.model,
                              device=device, dtype=config.dtype, window=config.window, preprocess=config.preprocess,
                              threads=config.worker_threads(device), log_level=logging.getLogger().level)
            self._handles.append(WorkerHandle(spec, self._context))
        try:
            readies = await asyncio.gather(*(h.start(config.startup_timeout_s) for h in self._handles))
            self._setup(readies)
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

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop task that fails says why, and every request ends (none may hang)."""
        if task.cancelled() or self._closing or task.exception() is None:
            return  # cancelled at close, or a receive loop whose worker died (handled there)
        log.error("engine task %s ended: %r; failing every request", task.get_name(), task.exception())
        self._closing = True
        for key in list(self._pending):
            self._fail(key, "worker_failed", f"the engine failed internally ({task.exception()!r})")

    def _setup(self, readies: Sequence[WorkerReady]) -> None:
        self.ready = readies[0]
        self.capacities = agreed_capacities(readies)
        self.layout = output_layout(self.ready, self.capacities, self.config.output_windows,
                                    self.config.item_token_limit)
        states = []
        for ready in readies:
            self._pools[ready.worker] = SlabPool(f"w{ready.worker}", self.layout.slot_rows * self.layout.row_bytes,
                                                 self.layout.slots)
            states.append(WorkerState(ready.worker, predictor(ready, self.capacities),
                                      free_rows=self.layout.slots * self.layout.slot_rows,
                                      row_granularity=self.layout.slot_rows))
        self.scheduler = Scheduler(self.config.scheduler, self.capacities, states)

    async def close(self) -> None:
        """Fail what is still pending with `shutting_down`, stop the workers, remove every slab."""
        self._closing = True
        for key in list(self._pending):
            self._fail(key, "shutting_down", "the engine is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in self._handles), return_exceptions=True)
        for pool in self._pools.values():
            pool.close()
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

    def admit(self, items: Sequence[Any]) -> list[AdmittedItem]:
        if not items:
            raise EngineError("invalid_input", "a request needs at least one item")
        try:
            admitted = [admit(item, self.config.preprocess, self.config.item_token_limit, f"item {i}")
                        for i, item in enumerate(items)]
        except AdmissionError as err:
            raise EngineError(err.code, err.message) from None
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

    def submit(self, items: list[AdmittedItem], deadline_ms: float | None,
               priority: int) -> tuple[int, asyncio.Future]:
        """Queue admitted items; the future gets their output references or an EngineError."""
        if self._closing or self.scheduler is None:
            raise EngineError("shutting_down", "the engine is not running")
        if not any(state.ready for state in self.scheduler.workers.values()):
            raise EngineError("worker_failed", "no worker is running")
        if deadline_ms is not None and not 0 <= deadline_ms <= MAX_DEADLINE_MS:
            raise EngineError("invalid_input", f"deadline_ms must be from 0 to {MAX_DEADLINE_MS:.0f} (a day), or "
                                               f"None for no deadline; got {deadline_ms!r}")
        loop = asyncio.get_running_loop()
        key = next(self._keys)
        now = loop.time()
        request = Request(key, priority, deadline_at(now, deadline_ms), now, [(i.tokens, i.sequences) for i in items])
        pending = _Pending(items, loop.create_future(), [None] * len(items))
        self._pending[key] = pending
        failure = self.scheduler.submit(request, now)
        if failure is not None:
            self._fail(key, failure.code, failure.message, failure.retry_after_ms)
        else:
            self._poke.set()
        return key, pending.future

    def stats(self) -> dict[str, float]:
        """Counts for health checks and tests: queue, requests not yet released, windows and slots in use."""
        return {
            "queued_items": float(len(self.scheduler.queue)) if self.scheduler else 0.0,
            "requests_open": float(len(self._pending)),
            "windows_in_flight": float(len(self._windows)),
            "slots_leased": float(sum(p.total_slots - p.free_slots() for p in self._pools.values())),
            "windows_sent": float(self._windows_sent),
            "items_sent": float(self._items_sent),
            "worker_ms": self._worker_ms,
            "leases_expired": float(self._leases_expired),
        }

    def is_open(self, key: int) -> bool:
        """Whether the request is still running or holds a result not yet released."""
        return key in self._pending

    def read(self, ref: OutputRef) -> np.ndarray:
        """A read-only view of one item's output rows (rows, 1 + deepstack, out_hidden)."""
        return ref_array(ref, self._reader)

    def cancel(self, key: int) -> bool:
        """Cancel a request still running: its queued items are dropped, in-flight results discarded."""
        pending = self._pending.get(key)
        if pending is None or (pending.future.done() and not pending.future.cancelled()):
            return False  # unknown, or finished (failed requests are forgotten at once)
        self._fail(key, "cancelled", "cancelled by the client")
        return True

    def release(self, key: int) -> None:
        """The caller is done with a request's outputs: their slots may be reused. Releasing a
        request that is still running cancels it."""
        if self.cancel(key):
            return
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._release_slots(pending)

    async def _lease_loop(self, timeout_s: float) -> None:
        """Reclaim results whose holders never released them: memory stays bounded whatever a
        client does (one that exited is caught sooner, by the frontend)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(LEASE_CHECK_S, timeout_s / 4))
            oldest = loop.time() - timeout_s
            expired = [key for key, p in self._pending.items() if p.delivered_at is not None and p.delivered_at < oldest]
            for key in expired:
                self.release(key)
            if expired:
                self._leases_expired += len(expired)
                log.warning("reclaimed %d results not released within lease_timeout_s=%g", len(expired), timeout_s)

    def _fail(self, key: int, code: str, message: str, retry_after_ms: float | None = None) -> None:
        if self.scheduler is not None:
            self.scheduler.cancel(key)
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        self._release_slots(pending)
        if not pending.future.done():
            pending.future.set_exception(EngineError(code, message, retry_after_ms))

    def _release_slots(self, pending: _Pending) -> None:
        for worker, slot in pending.slots:
            self._release_slot(worker, slot)
        pending.slots.clear()

    def _release_slot(self, worker: int, slot: Slot) -> None:
        pool = self._pools.get(worker)
        if pool is not None and not self._closing:
            pool.release(slot)
            self._sync_free_rows(worker)
            self._poke.set()

    def _sync_free_rows(self, worker: int) -> None:
        self.scheduler.workers[worker].free_rows = self._pools[worker].largest_free_run() * self.layout.slot_rows
