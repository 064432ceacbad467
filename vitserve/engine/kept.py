"""Kept items: results their caller names (`keep=` on encode) so that another reader finds them by
name, e.g. a vLLM consumer's connector reading rows a proxy had encoded. A kept item holds its
output slot until it is forgotten (`forget`), or its keep time runs out, or kept items take more
than `kept_share` of a worker's output rows (the oldest go first). A lookup hands out references
as a result does: held until the reader releases them (or its connection ends, or the lease
times out), so a kept item forgotten meanwhile is not overwritten under its reader.

A mixin of `Engine` (engine.py), which owns the pools, the pending requests and the loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from vitserve.ipc.messages import MAX_NAME_LENGTH, OutputRef
from vitserve.ipc.slabs import Slot

from .errors import EngineError
from .intake import Pending

log = logging.getLogger(__name__)

KEPT_CHECK_S = 1.0  # how often expired kept items are forgotten


@dataclass
class KeptItem:
    ref: OutputRef
    worker: int
    slot: Slot
    rows: int  # of the run it holds (a kept item holds its window's whole run)
    expires_at: float  # loop time


class KeptItems:
    def _check_keep(self, names: Sequence[str] | None, items: int, keep_s: float | None) -> None:
        """Refuse a keep= that cannot be honoured, before the request is queued."""
        if names is None:
            return
        if len(names) != items:
            raise EngineError("invalid_input", f"keep names {len(names)} items, the request has {items}: give one "
                                               f"name per item ('' for an item not to keep)")
        for name in names:
            if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
                raise EngineError("invalid_input", f"a keep name is a string of at most {MAX_NAME_LENGTH} "
                                                   f"characters; got {name!r:.80}")
        if keep_s is not None and not 0 < keep_s <= self.config.kept_timeout_s:
            raise EngineError("invalid_input", f"keep_s must be above 0 and at most kept_timeout_s="
                                               f"{self.config.kept_timeout_s:g}; got {keep_s!r}")

    def _keep(self, pending: Pending, now: float) -> None:
        """A request with keep names has ended with its result: each named item holds its slot."""
        slot_bytes = self.layout.slot_rows * self.layout.row_bytes
        keep_s = pending.keep_s or self.config.kept_timeout_s
        touched = set()
        for name, ref in zip(pending.keep, pending.outputs):
            if not name or ref is None:
                continue
            worker, slot = next((w, s) for w, s in pending.slots if s.slab == ref.slab and s.epoch == ref.epoch
                                and s.offset <= ref.offset < s.offset + s.count * slot_bytes)
            self._forget_one(name)  # a name names one item: the newest
            self._hold_slot(worker, slot)
            rows = slot.count * self.layout.slot_rows
            self._kept[name] = KeptItem(ref, worker, slot, rows, now + keep_s)
            self._kept_rows[worker] = self._kept_rows.get(worker, 0) + rows
            touched.add(worker)
        for worker in touched:
            self._evict_kept(worker)

    def lookup_refs(self, names: Sequence[str]) -> tuple[int, list[OutputRef | None]]:
        """References to the kept items of these names (None where there is none), held until
        `release(key)` of the returned key, as a result's are."""
        if self._closing or self.scheduler is None:
            raise EngineError("shutting_down", "the engine is shutting down or not running")
        now = asyncio.get_running_loop().time()
        refs: list[OutputRef | None] = []
        pending = Pending([], asyncio.get_running_loop().create_future(), refs, delivered_at=now)
        for name in names:
            kept = self._kept.get(name)
            if kept is None or kept.expires_at <= now:
                refs.append(None)
                continue
            self._hold_slot(kept.worker, kept.slot)
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
        self._kept_rows[kept.worker] -= kept.rows
        self._release_slot(kept.worker, kept.slot)
        return True

    def _evict_kept(self, worker: int) -> None:
        """Kept items may hold at most kept_share of a worker's rows (counting each one's whole run, so
        two in one window count twice: never less than they hold): past it, its oldest go."""
        limit = self.config.kept_share * self.layout.slots * self.layout.slot_rows
        while self._kept_rows.get(worker, 0) > limit:
            name = next(n for n, kept in self._kept.items() if kept.worker == worker)  # (insertion order: oldest)
            self._forget_one(name)
            self._kept_evicted += 1

    async def _kept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEPT_CHECK_S)
            now = loop.time()
            expired = [name for name, kept in self._kept.items() if kept.expires_at <= now]
            for name in expired:
                self._forget_one(name)
            self._kept_expired += len(expired)

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
