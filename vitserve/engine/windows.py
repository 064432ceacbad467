"""The engine's traffic with its workers: the dispatch loop that sends the scheduler's windows,
and the receive loops that complete them (and notice a worker that died or is stuck).

A mixin of `Engine` (engine.py), which owns the state used here: the scheduler, the slab pools,
the pending requests and the windows in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vitserve.ipc.messages import OutputRef
from vitserve.ipc.worker_messages import (
    InputsDropped, ProbeDone, RunWindow, WindowDone, WindowFailed, WindowItem, WorkerWarm,
)
from vitserve.ipc.slabs import SlabError, Slot
from vitserve.models.protocol import item_rows
from vitserve.scheduler import Dispatch

from .worker_handle import WorkerHandle

log = logging.getLogger(__name__)

LIVENESS_POLL_S = 0.5  # how often an idle receive loop checks that its worker is alive (or one heartbeat, if shorter)
MAX_FAILED_POLLS = 1000  # scheduling failures in a row, each failing a request, before the engine gives up


class WindowTraffic:
    # -- the loops -----------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failed_polls = 0  # in a row: a fault that failing requests does not cure stops the loop
        while True:
            self._poke.clear()
            try:
                dispatches = self._poll(loop.time())
                failed_polls = 0
            except Exception as err:
                failed_polls += 1
                if failed_polls > MAX_FAILED_POLLS or not self._fail_queue_head(err):
                    raise  # the engine cannot go on: _loop_ended fails everything and says so
                dispatches = []
            self._send_all(dispatches)
            wakeup = self.scheduler.wakeup
            alarm = None if wakeup is None else loop.call_at(wakeup, self._poke.set)  # cheaper than wait_for
            await self._poke.wait()
            if alarm is not None:
                alarm.cancel()

    def dispatch_now(self) -> None:
        """Send the windows the scheduler would send now, at the end of a burst of requests from
        the frontend, instead of a loop turn later in the dispatch loop (which still runs: it
        re-arms its alarm, and deals with a failing poll)."""
        if not self.started or self._closing or not self._poke.is_set():
            return
        try:
            dispatches = self._poll(asyncio.get_running_loop().time())
        except Exception:  # the dispatch loop's poll meets it again (the poke stays set) and deals with it
            return
        self._send_all(dispatches)

    def _send_all(self, dispatches: list[Dispatch]) -> None:
        for dispatch in dispatches:
            try:
                self._send(dispatch)
            except Exception as err:  # contained to the requests of this window
                self._window_broke(dispatch, err)

    def _poll(self, now: float) -> list[Dispatch]:
        """The scheduler's windows to send now, after failing what it gave up on."""
        dispatches, failures = self.scheduler.poll(now)
        for failure in failures:
            self._fail(failure.request.key, failure.code, failure.message, failure.retry_after_ms)
        while stalled := self.scheduler.stalled_on_memory():
            if self._forget_oldest():  # kept items are a cache: they yield to requests waiting for rows
                self._kept_evicted += 1
                continue
            for request in stalled:
                self._fail_stalled(request.key)
        return dispatches

    def _fail_stalled(self, key: int) -> None:
        """No output rows are free and nothing running will free any. A request that holds rows
        itself and cannot complete even with all of a worker's rows can never succeed: too_large;
        the others may succeed once results are released: overloaded."""
        pending = self._pending.get(key)
        held = sum(slot.count for _, slot in pending.slots) * self.layout.slot_rows if pending else 0
        needed = sum(item_rows(item.grid, self.capacities.merge_factor, self.ready.temporal_pool)
                     for item, output in zip(pending.items, pending.outputs) if output is None) if pending else 0
        capacity = self.layout.slots * self.layout.slot_rows
        if held and held + needed > capacity:
            self._fail(key, "too_large", f"the request's outputs ({needed} rows still to come: {held} rows "
                       f"held so far) do not fit the {capacity} rows of a worker's shared-memory output: split it, "
                       f"or raise output_windows")
        else:
            self._fail(key, "overloaded", "every shared-memory output row is held by results not yet released "
                       "(or by lookups of kept items): release results sooner, or raise output_windows",
                       retry_after_ms=100.0)

    def _fail_queue_head(self, err: Exception) -> bool:
        """The scheduler failed on its queue: fail the request at its head, the one the failed step
        was forming a window from, so the next poll makes progress. False when nothing is queued."""
        head = next(iter(self.scheduler.queue), None)
        if head is None:
            return False
        self._internal_errors += 1
        self._log_limits.error("poll", "scheduling failed on request %d; failing it: %r", head.request.key, err,
                               exc_info=True)
        self._fail(head.request.key, "worker_failed", f"the engine failed to schedule the request ({err!r})")
        self._poke.set()  # poll again at once: the rest of the queue is waiting
        return True

    def _window_broke(self, dispatch: Dispatch, err: Exception) -> None:
        """Sending a window failed unexpectedly: its requests fail, its rows and place are given back."""
        self._internal_errors += 1
        self._log_limits.error("send", "window %d could not be sent: %r", dispatch.window, err, exc_info=True)
        sent = self._windows.pop(dispatch.window, None)
        if self.scheduler.holds(dispatch.window):
            self.scheduler.window_done(dispatch.window, asyncio.get_running_loop().time(), learn=False)
        keys = {item.request.key for item in dispatch.items}
        for key in keys:
            if sent is not None:
                with contextlib.suppress(SlabError):  # a reference the failed send never added
                    self._release_slot(dispatch.worker, sent[1])  # the window's reference for this request
            self._fail(key, "worker_failed", f"the engine failed to send the request's window ({err!r})")

    def _send(self, dispatch: Dispatch) -> None:
        loop = asyncio.get_running_loop()
        keys = {item.request.key for item in dispatch.items}
        if not self.scheduler.holds(dispatch.window):
            return  # its worker was lost while this poll's windows went out: its items were retried or failed then
        pool = self._pools[dispatch.worker]
        admitted = [self._pending[item.request.key].items[item.index] for item in dispatch.items]
        rows = sum(item.rows for item in dispatch.items)  # as admission counted them (a Kimi chunk: one frame's)
        slot = pool.acquire(self.layout.slots_for(rows))
        if slot is None:  # should not happen (the scheduler counts rows in whole slots); fail, do not stop
            self.scheduler.window_done(dispatch.window, loop.time(), learn=False)
            for key in keys:
                self._fail(key, "overloaded", "no shared-memory output rows are free", retry_after_ms=100.0)
            return
        sent = loop.time()
        self._windows[dispatch.window] = (dispatch, slot, sent)  # from here on, _window_broke frees it
        for item in dispatch.items:
            self.latencies.observe("queue_wait", sent - item.request.arrival)
        self.latencies.count("items_per_window", len(dispatch.items))
        self.latencies.count("sequences_per_window", sum(item.sequences for item in dispatch.items))
        if len(keys) > 1:  # one reference per request with items in the window
            pool.hold(slot, len(keys) - 1)
        self._sync_free_rows(dispatch.worker)
        self._windows_sent += 1
        self._items_sent += len(dispatch.items)
        window_items = [WindowItem(item.kind, item.grid, item.slab, item.offset,
                                   "float32" if item.kind == "patches" else "uint8", item.array.shape)
                        for item in admitted]
        handle = self._handles[dispatch.worker]
        if not handle.send_now(RunWindow(dispatch.window, window_items, slot.slab, slot.offset,
                                         slot.count * pool.slot_bytes, dispatch.predicted_ms)):
            self._worker_died(handle)  # the link is broken: the process is gone
            return
        self._busy_polling.expect(dispatch.window, sent, self.scheduler.workers[dispatch.worker].busy_until)

    async def _receive_loop(self, handle: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        # The process's end wakes the loop at once (a restart starts without waiting for a poll).
        sentinel = handle.process.sentinel
        loop.add_reader(sentinel, handle.link.interrupt)
        try:
            await self._receive_from(handle)
        finally:
            loop.remove_reader(sentinel)

    async def _receive_from(self, handle: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        poll_s = min(LIVENESS_POLL_S, handle.heartbeat.period_s)
        while True:
            messages = await handle.receive(poll_s)
            if self._handles[handle.worker] is not handle or not self.scheduler.workers[handle.worker].ready:
                return  # lost while this loop waited (e.g. a send found no peer): its windows were dealt with
            if not messages and (not handle.alive() or self._check_hung(handle)
                                 or self._check_stuck(handle, loop.time())):
                self._worker_died(handle)
                return
            for message in messages:
                match message:
                    case WindowDone(window=window, rows=rows, worker_ms=worker_ms, gpu_ms=gpu_ms, runs=runs):
                        self._busy_polling.arrived(window, loop.time())
                        self._worker_ms += worker_ms
                        self._gpu_busy_ms += gpu_ms
                        self.run_counts.add(handle.worker, runs, gpu_ms)
                        self.latencies.observe("preprocess", message.preprocess_ms / 1e3)
                        self.latencies.observe("output_transfer", message.transfer_ms / 1e3)
                        self._worker_proven(handle.worker)
                        self._complete(window, rows, loop.time())
                    case ProbeDone():
                        self._probe_answered(handle.worker, message)
                    case WindowFailed(window=window, message=problem):
                        self._busy_polling.arrived(window, loop.time())
                        dispatch, slot, _ = self._windows.pop(window)
                        self.scheduler.window_done(window, loop.time(), learn=False)
                        self._fail_window(dispatch, slot, f"worker {dispatch.worker} failed the window: {problem}")
                    case InputsDropped(slab=slab):
                        self.inputs.dropped(handle.worker, slab)
                    case WorkerWarm():
                        self._worker_warm(handle.worker, message)
            if messages:
                self._poke.set()
                if not self._windows:
                    self._busy_polling.idle()

    def _fail_window(self, dispatch: Dispatch, slot: Slot, problem: str) -> None:
        for key in {item.request.key for item in dispatch.items}:
            self._release_slot(dispatch.worker, slot)  # the window's reference for this request
            self._fail(key, "worker_failed", problem)

    def _complete(self, window: int, rows: list[int], now: float) -> None:
        dispatch, slot, sent = self._windows.pop(window)
        self.scheduler.window_done(window, now)
        self.latencies.observe("window_run", now - sent)
        merge, pool = self.capacities.merge_factor, self.ready.temporal_pool
        for item, first_row in zip(dispatch.items, rows):
            pending = self._pending.get(item.request.key)
            if pending is None:
                continue
            admitted = pending.items[item.index]
            rows_shape = (item_rows(admitted.grid, merge, pool), *self.layout.row_shape)
            pending.outputs[item.index] = OutputRef(
                shape=rows_shape, dtype=self.ready.dtype, kind=admitted.kind,
                grid=admitted.grid, slab=slot.slab, epoch=slot.epoch,
                offset=slot.offset + first_row * self.layout.row_bytes)
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
                self.latencies.observe("end_to_end", now - request.arrival)
                self._late_results += now > request.deadline
                if pending.keep is not None:
                    try:
                        self._keep(pending, now)
                    except Exception as err:  # contained: the result stands, its items are not kept
                        self._internal_errors += 1
                        self._log_limits.error("keep", "keeping request %d's items failed: %r", key, err,
                                               exc_info=True)
                self._drop_inputs(pending)
