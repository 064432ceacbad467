"""How requests end and give their shared-memory slots back: cancel, release, failure, lease expiry.

A mixin of `Engine` (engine.py), which owns the state used here: the scheduler, the pending
requests and the slab pools, current and retired (a pool outlives its worker's restart until
every result in it is released).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import numpy as np

from vitserve.ipc.slabs import SlabError, SlabPool, Slot

from .errors import EngineError

log = logging.getLogger(__name__)

LEASE_CHECK_S = 1.0  # how often unreleased results are checked against the lease timeout
_NO_INPUT = np.empty(0, np.uint8)  # what a request's items hold once their pixels are dropped


class RequestEnds:
    def is_open(self, key: int) -> bool:
        """Whether the request is still running or holds a result not yet released."""
        return key in self._pending

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
            self._drop_inputs(pending)
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
        self._drop_inputs(pending)
        self._release_slots(pending)
        if not pending.future.done():
            pending.future.set_exception(EngineError(code, message, retry_after_ms))

    def _release_slots(self, pending) -> None:
        for worker, slot in pending.slots:
            self._release_slot(worker, slot)
        pending.slots.clear()

    def _release_slot(self, worker: int, slot: Slot) -> None:
        """Drop one reference to a leased run, in the pool of the slot's epoch."""
        if self._closing:
            return  # the pools are closed or about to be
        pool = self._pools.get(worker)
        if pool is not None and pool.epoch == slot.epoch:
            pool.release(slot)
            self._sync_free_rows(worker)
            self._poke.set()
            return
        retired = self._retired.get((worker, slot.epoch))
        if retired is not None and retired.release(slot):
            self._close_if_unused(worker, slot.epoch)

    def _close_if_unused(self, worker: int, epoch: int) -> None:
        """A retired pool goes with its last result: the slabs of the lost worker are removed."""
        retired = self._retired.get((worker, epoch))
        if retired is not None and retired.free_slots() == retired.total_slots:
            del self._retired[(worker, epoch)]
            retired.close()

    def _sync_free_rows(self, worker: int) -> None:
        self.scheduler.workers[worker].free_rows = self._pools[worker].largest_free_run() * self.layout.slot_rows

    def _all_pools(self) -> list[SlabPool]:
        return [*self._pools.values(), *self._retired.values()]

    def slab_descriptor(self, slab: str) -> int | None:
        """The read-only descriptor of `slab` in a current or retired pool (results of a lost worker
        stay readable until released), None when no pool has it. The slab channel passes it on."""
        for pool in self._all_pools():
            fd = pool.descriptor(slab)
            if fd is not None:
                return fd
        return None

    def _open_slab(self, slab: str) -> int:
        """A descriptor of `slab` for the engine's own reader (embedded use), which closes it."""
        fd = self.slab_descriptor(slab)
        if fd is None:
            raise SlabError(f"slab {slab} is not one of this engine's: its worker restarted or the reference "
                            f"is not from this engine; request the result again")
        return os.dup(fd)

    def held_rows(self, key: int) -> int:
        """Output rows leased for a request's finished windows (its result's, once delivered)."""
        pending = self._pending.get(key)
        return sum(slot.count for _, slot in pending.slots) * self.layout.slot_rows if pending else 0

    def _drop_inputs(self, pending) -> None:
        """The request's inputs are needed no more (its result is in, or it ended): they count no
        more against max_queued_bytes, and their memory goes with the last reference."""
        self._queued_bytes -= pending.input_bytes
        pending.input_bytes = 0
        if pending.input_region is not None:  # a window still copying from it reads only this request's inputs
            self.inputs.give_back(pending.input_region)
            pending.input_region = None
        if pending.items and pending.items[0].array is not _NO_INPUT:  # (once: at the result, not again at its release)
            pending.items = [dataclasses.replace(item, array=_NO_INPUT) for item in pending.items]
