"""The engine's traffic with its workers: the dispatch loop that sends the scheduler's windows,
and the receive loops that complete them (and notice a worker that died or is stuck).

A mixin of `Engine` (engine.py), which owns the state used here: the scheduler, the slab pools,
the pending requests and the windows in flight.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from vitserve.ipc.messages import ArrayRef, OutputRef, RunWindow, WindowDone, WindowFailed, WindowItem
from vitserve.ipc.slabs import Slot
from vitserve.scheduler import Dispatch

from .worker_handle import WorkerHandle

log = logging.getLogger(__name__)

LIVENESS_POLL_S = 0.5  # how often an idle receive loop checks that its worker process is alive


class WindowTraffic:
    # -- the loops -----------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._poke.clear()
            dispatches, failures = self.scheduler.poll(loop.time())
            for failure in failures:
                self._fail(failure.request.key, failure.code, failure.message, failure.retry_after_ms)
            while stalled := self.scheduler.stalled_on_memory():
                for request in stalled:
                    self._fail(request.key, "overloaded", "every shared-memory output row is held by results not "
                               "yet released: release results sooner, or raise output_windows", retry_after_ms=100.0)
            for dispatch in dispatches:
                self._send(dispatch)
            wakeup = self.scheduler.wakeup
            alarm = None if wakeup is None else loop.call_at(wakeup, self._poke.set)  # cheaper than wait_for
            await self._poke.wait()
            if alarm is not None:
                alarm.cancel()

    def _send(self, dispatch: Dispatch) -> None:
        loop = asyncio.get_running_loop()
        keys = {item.request.key for item in dispatch.items}
        if not self.scheduler.holds(dispatch.window):
            return  # its worker was lost while this poll's windows went out: its items were retried or failed then
        pool = self._pools[dispatch.worker]
        rows = dispatch.tokens // self.capacities.merge_factor
        slot = pool.acquire(self.layout.slots_for(rows))
        if slot is None:  # should not happen (the scheduler counts rows in whole slots); fail, do not stop
            self.scheduler.window_done(dispatch.window, loop.time(), learn=False)
            for key in keys:
                self._fail(key, "overloaded", "no shared-memory output rows are free", retry_after_ms=100.0)
            return
        if len(keys) > 1:  # one reference per request with items in the window
            pool.hold(slot, len(keys) - 1)
        self._sync_free_rows(dispatch.worker)
        self._windows[dispatch.window] = (dispatch, slot, loop.time())
        self._windows_sent += 1
        self._items_sent += len(dispatch.items)
        window_items, frames = [], []
        for item in dispatch.items:
            admitted = self._pending[item.request.key].items[item.index]
            array = np.ascontiguousarray(admitted.array)
            dtype = "float32" if admitted.kind == "patches" else "uint8"
            window_items.append(WindowItem(ArrayRef(len(frames), dtype, array.shape), admitted.kind, admitted.grid))
            frames.append(array)
        handle = self._handles[dispatch.worker]
        if not handle.send_now(RunWindow(dispatch.window, window_items, slot.slab, slot.offset), frames):
            self._worker_died(handle)  # no peer on the socket: the process is gone

    async def _receive_loop(self, handle: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        while True:
            messages = await handle.receive(LIVENESS_POLL_S)
            if self._handles[handle.worker] is not handle or not self.scheduler.workers[handle.worker].ready:
                return  # lost while this loop waited (e.g. a send found no peer): its windows were dealt with
            if not messages and (not handle.alive() or self._check_stuck(handle, loop.time())):
                self._worker_died(handle)
                return
            for message in messages:
                match message:
                    case WindowDone(window=window, rows=rows, worker_ms=worker_ms):
                        self._worker_ms += worker_ms
                        self._complete(window, rows, loop.time())
                    case WindowFailed(window=window, message=problem):
                        dispatch, slot, _ = self._windows.pop(window)
                        self.scheduler.window_done(window, loop.time(), learn=False)
                        self._fail_window(dispatch, slot, f"worker {dispatch.worker} failed the window: {problem}")
            if messages:
                self._poke.set()

    def _fail_window(self, dispatch: Dispatch, slot: Slot, problem: str) -> None:
        for key in {item.request.key for item in dispatch.items}:
            self._release_slot(dispatch.worker, slot)  # the window's reference for this request
            self._fail(key, "worker_failed", problem)

    def _complete(self, window: int, rows: list[int], now: float) -> None:
        dispatch, slot, _ = self._windows.pop(window)
        self.scheduler.window_done(window, now)
        merge = self.capacities.merge_factor
        for item, first_row in zip(dispatch.items, rows):
            pending = self._pending.get(item.request.key)
            if pending is None:
                continue
            admitted = pending.items[item.index]
            pending.outputs[item.index] = OutputRef(
                shape=(admitted.tokens // merge, *self.layout.row_shape), dtype=self.ready.dtype, slab=slot.slab,
                epoch=slot.epoch, offset=slot.offset + first_row * self.layout.row_bytes)
        for key in {item.request.key for item in dispatch.items}:
            pending = self._pending.get(key)
            if pending is None:  # failed or cancelled while the window ran: its reference goes now
                self._release_slot(dispatch.worker, slot)
                continue
            pending.slots.append((dispatch.worker, slot))
            request_items = [i for i in dispatch.items if i.request.key == key]
            request = request_items[0].request
            request.unfinished -= len(request_items)
            if request.unfinished == 0 and not pending.future.done():
                pending.future.set_result(list(pending.outputs))
                pending.delivered_at = now
