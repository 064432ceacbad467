"""How requests enter the engine: `encode` (the embedded API), `admit` (each item checked and
planned), `submit` (queued, its inputs placed in an input slab), and `read` of a result's rows.

A mixin of `Engine` (engine.py), which owns the state used here: the scheduler, the input slabs,
the pending requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vitserve.ipc.messages import OutputRef
from vitserve.ipc.outputs import Encoded, encoded_from_refs, ref_array
from vitserve.ipc.slabs import Slot
from vitserve.models.protocol import item_rows, item_segment_count
from vitserve.scheduler import Request, deadline_at

from .admission import AdmissionError, AdmittedItem, admit
from .errors import EngineError
from .outputs_layout import check_request_fits

MAX_DEADLINE_MS = 86_400_000.0  # a day: anything longer is a client bug, not a deadline


@dataclass(eq=False)
class Pending:
    items: list[AdmittedItem]
    future: asyncio.Future
    outputs: list[OutputRef | None]
    slots: list[tuple[int, Slot]] = field(default_factory=list)  # (worker, slot) held for this request
    delivered_at: float | None = None  # loop time the result was handed over; its lease runs from here
    input_bytes: int = 0  # of its inputs, counted against max_queued_bytes until they are dropped
    input_region: int | None = None  # where its inputs were copied into the engine's input slab, if they were
    keep: Sequence[str] | None = None  # names its items are kept under once it ends ('' : not kept; kept.py)
    keep_s: float | None = None  # how long they are kept (None: kept_timeout_s)



class RequestIntake:
    async def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
                     keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        """Encode images (uint8 H×W×3), videos (uint8 T×H×W×3) or (pixel_values, grid_thw) pairs.

        The result's tensors view shared memory until `release()` (or the `with` block's end, or
        garbage collection); raises EngineError with a code when the request fails. `keep`: a name
        per item ('' for none) under which `lookup` finds it later, for `keep_s` seconds at most
        (default and limit: kept_timeout_s) or until `forget` (kept.py)."""
        key, refs = await self.run(self.admit(items), deadline_ms, priority, keep, keep_s)
        return self._encoded(key, refs)

    async def lookup(self, names: Sequence[str]) -> Encoded:
        """The kept items of these names, in order (None where none is kept), held until `release()`."""
        key, refs = self.lookup_refs(names)
        return self._encoded(key, refs)

    def _encoded(self, key: int, refs: Sequence[OutputRef | None]) -> Encoded:
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
        places = slabs if slabs is not None else [("", -1)] * len(items)
        try:
            admitted = [admit(item, self.config.preprocess, self.item_token_limit, f"item {i}", place)
                        for i, (item, place) in enumerate(zip(items, places))]
        except AdmissionError as err:
            raise EngineError(err.code, err.message) from None
        size = sum(item.array.nbytes for item in admitted)
        if size > self.config.max_request_bytes:
            raise EngineError("too_large", f"the request's inputs take {size} bytes, over the engine's "
                                           f"max_request_bytes={self.config.max_request_bytes}: split it")
        return admitted

    async def run(self, items: list[AdmittedItem], deadline_ms: float | None, priority: int,
                  keep: Sequence[str] | None = None, keep_s: float | None = None) -> tuple[int, list[OutputRef]]:
        """Queue admitted items and wait for their output references (they stay leased until `release`)."""
        key, future = self.submit(items, deadline_ms, priority, keep=keep, keep_s=keep_s)
        try:
            return key, await future
        except asyncio.CancelledError:
            self.release(key)  # cancels it if it is still running; frees its slots if it had finished
            raise

    def submit(self, items: list[AdmittedItem], deadline_ms: float | None, priority: int, owner: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> tuple[int, asyncio.Future]:
        """Queue admitted items; the future gets their output references or an EngineError.
        `owner` names the client: clients take fair turns (a frontend passes its connection's number).
        `keep`, `keep_s`: as for `encode`."""
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
        pool = self.ready.temporal_pool  # a segment per `pool` frames (Kimi K2.5: chunks of 4)
        shapes = [(i.tokens, item_segment_count(i.grid[0], pool)) for i in items]  # (tokens, segments) each
        rows = [item_rows(i.grid, self.capacities.merge_factor, pool) for i in items]
        check_request_fits(shapes, rows, self.capacities, self.layout, self.config.output_windows)
        self._check_keep(keep, items, keep_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        size = sum(item.array.nbytes for item in items)
        if self._queued_bytes + size > self.config.max_queued_bytes:
            raise EngineError("overloaded", f"the inputs of unfinished requests take {self._queued_bytes} bytes; "
                                            f"{size} more would pass max_queued_bytes={self.config.max_queued_bytes}",
                              self.scheduler.drain_ms(now))
        items, region = self.inputs.place(items)
        key = next(self._keys)
        request = Request(key, priority, deadline_at(now, deadline_ms), now, shapes, owner, rows)
        pending = Pending(items, loop.create_future(), [None] * len(items), input_bytes=size, input_region=region,
                          keep=keep if keep and any(keep) else None, keep_s=keep_s)
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


    def read(self, ref: OutputRef) -> np.ndarray:
        """A read-only view of one item's output rows (rows, 1 + deepstack, out_hidden)."""
        return ref_array(ref, self._reader)
