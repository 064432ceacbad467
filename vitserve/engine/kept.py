"""Kept items: results their caller names (`keep=` on encode) so that another reader finds them by
name, e.g. a vLLM consumer's connector reading rows a proxy had encoded. A kept item holds its
window's output run until it is forgotten (`forget`), or its keep time runs out, or the runs kept
items hold take more than `kept_share` of a worker's output rows (the oldest items go first), or
requests wait for output rows that only kept items hold (a cache yields to work). A lookup hands
out references as a result does: held until the reader releases them (or its connection ends, or
the lease times out), so an item forgotten meanwhile is not overwritten under its reader.

Names are one space for every client of the engine: any client that may connect may look up or
forget any name (the endpoint's permissions and CURVE keys say who may connect).

A mixin of `Engine` (engine.py), which owns the pools, the pending requests and the loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

from vitserve.ipc.messages import MAX_NAME_LENGTH, OutputRef
from vitserve.ipc.slabs import SlabError, Slot
from vitserve.models.protocol import item_rows

from .admission import AdmittedItem
from .errors import EngineError
from .intake import Pending

KEPT_CHECK_S = 1.0  # how often expired kept items are forgotten

RunKey = tuple[int, int, int]  # (worker, epoch, first slot): one window's run of output rows


@dataclass
class KeptItem:
    ref: OutputRef
    worker: int
    slot: Slot
    expires_at: float  # loop time

    @property
    def run(self) -> RunKey:
        return self.worker, self.slot.epoch, self.slot.index


class KeptItems:
    def _check_keep(self, names: Sequence[str] | None, items: Sequence[AdmittedItem], keep_s: float | None) -> None:
        """Refuse a keep= that cannot be honoured, before the request is queued."""
        if names is None:
            if keep_s is not None:
                raise EngineError("invalid_input", "keep_s is how long named items are kept: give keep names too")
            return
        if len(names) != len(items):
            raise EngineError("invalid_input", f"keep names {len(names)} items, the request has {len(items)}: give "
                                               f"one name per item ('' for an item not to keep)")
        for name in names:
            if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
                raise EngineError("invalid_input", f"a keep name is a string of at most {MAX_NAME_LENGTH} "
                                                   f"characters; got {name!r:.80}")
        if keep_s is not None and not 0 < keep_s <= self.config.kept_timeout_s:
            raise EngineError("invalid_input", f"keep_s must be above 0 and at most kept_timeout_s="
                                               f"{self.config.kept_timeout_s:g}; got {keep_s!r}")
        limit = self._kept_limit()
        for name, item in zip(names, items):
            rows = item_rows(item.grid, self.capacities.merge_factor, self.ready.temporal_pool)
            if name and rows > limit:
                raise EngineError("too_large", f"item {name!r} has {rows} "
                                               f"output rows, more than kept items may hold ({limit}, kept_share="
                                               f"{self.config.kept_share:g} of a worker's rows): keep it not, or "
                                               f"raise --kept-share")

    def _kept_limit(self) -> float:
        return self.config.kept_share * self.layout.slots * self.layout.slot_rows

    def _keep(self, pending: Pending, now: float) -> None:
        """A request with keep names has ended with its result: each named item holds its window's run."""
        slot_bytes = self.layout.slot_rows * self.layout.row_bytes
        expires_at = now + (pending.keep_s or self.config.kept_timeout_s)
        for name, ref in zip(pending.keep, pending.outputs):
            if not name or ref is None:
                continue
            where = next(((w, s) for w, s in pending.slots if s.slab == ref.slab and s.epoch == ref.epoch
                          and s.offset <= ref.offset < s.offset + s.count * slot_bytes), None)
            self._forget_one(name)  # a name names one item: the newest
            try:
                if where is None:
                    raise SlabError(f"no slot of the request holds {ref}")
                self._hold_slot(*where)
            except (SlabError, KeyError) as err:  # not kept (a lookup misses it); the request itself is unharmed
                self._internal_errors += 1
                self._log_limits.error("keep", "item %r could not be kept: %r", name, err)
                continue
            kept = self._kept[name] = KeptItem(ref, *where, expires_at)
            self._count_run(kept, +1)
            while self._kept_rows.get(kept.worker, 0) > self._kept_limit() and self._forget_oldest(kept.worker):
                self._kept_evicted += 1

    def lookup_refs(self, names: Sequence[str]) -> tuple[int, list[OutputRef | None]]:
        """References to the kept items of these names (None where there is none), held until
        `release(key)` of the returned key, as a result's are."""
        if self.failure is not None:
            raise EngineError("worker_failed", f"the engine stopped after an internal failure ({self.failure!r})")
        if self._closing or self.scheduler is None:
            raise EngineError("shutting_down", "the engine is shutting down or not running")
        loop = asyncio.get_running_loop()
        refs: list[OutputRef | None] = []
        pending = Pending([], loop.create_future(), refs, delivered_at=loop.time())
        for name in names:
            kept = self._kept.get(name)
            if kept is None or kept.expires_at <= loop.time():
                refs.append(None)
                continue
            try:
                self._hold_slot(kept.worker, kept.slot)
            except (SlabError, KeyError) as err:  # (its pool is gone: nothing to read any more)
                self._internal_errors += 1
                self._log_limits.error("lookup", "kept item %r is unreadable: %r", name, err)
                self._kept.pop(name)
                self._count_run(kept, -1)
                refs.append(None)
                continue
            pending.slots.append((kept.worker, kept.slot))
            refs.append(kept.ref)
        pending.future.set_result(list(refs))
        key = next(self._keys)
        self._pending[key] = pending
        self._kept_lookups += 1
        self._kept_hits += sum(ref is not None for ref in refs)
        return key, refs

    def forget(self, names: Sequence[str]) -> int:
        """Drop these names (unknown ones are skipped); their rows stay readable by whoever looked
        them up until released. Returns how many were kept."""
        return sum(self._forget_one(name) for name in names)

    def _forget_one(self, name: str) -> bool:
        kept = self._kept.pop(name, None)
        if kept is None:
            return False
        self._count_run(kept, -1)
        self._release_slot(kept.worker, kept.slot)
        return True

    def _forget_oldest(self, worker: int | None = None) -> bool:
        """Forget the item kept longest (on `worker`, if given); False when there is none."""
        name = next((n for n, kept in self._kept.items() if worker in (None, kept.worker)), None)  # (oldest first)
        return name is not None and self._forget_one(name)

    def _count_run(self, kept: KeptItem, change: int) -> None:
        """Kept items per run: a run counts against kept_share once, however many of its items are kept."""
        count = self._kept_runs.get(kept.run, 0) + change
        rows = kept.slot.count * self.layout.slot_rows
        if count:
            self._kept_runs[kept.run] = count
        else:
            del self._kept_runs[kept.run]
            self._kept_rows[kept.worker] -= rows
        if count == 1 and change > 0:
            self._kept_rows[kept.worker] = self._kept_rows.get(kept.worker, 0) + rows

    async def _kept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEPT_CHECK_S)
            now = loop.time()
            for name in [name for name, kept in self._kept.items() if kept.expires_at <= now]:
                try:
                    self._kept_expired += self._forget_one(name)
                except Exception as err:  # contained: the loop goes on
                    self._internal_errors += 1
                    self._log_limits.error("kept", "forgetting kept item %r failed: %r", name, err)

    def _hold_slot(self, worker: int, slot: Slot) -> None:
        """One more reference to a leased run, in the pool of the slot's epoch (as _release_slot drops one)."""
        pool = self._pools.get(worker)
        if pool is None or pool.epoch != slot.epoch:
            pool = self._retired[(worker, slot.epoch)]
        pool.hold(slot)

    def _kept_stats(self) -> dict[str, float]:
        return {"kept_items": float(len(self._kept)), "kept_rows": float(sum(self._kept_rows.values())),
                "kept_lookups": float(self._kept_lookups), "kept_hits": float(self._kept_hits),
                "kept_expired": float(self._kept_expired), "kept_evicted": float(self._kept_evicted)}
