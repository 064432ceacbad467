"""Output slabs: a worker writes each window's rows once, local clients read them in place.

This module names slabs and leases their slots (the engine's side); `sealed` makes them (in the
worker, which alone may write them), `slab_maps` maps them read-only in clients, and
`slab_channel` hands clients their descriptors.

A worker's slabs are sealed memory files cut into page-aligned slots. The engine leases a run of
consecutive slots per encoder window, as many as its rows need (a small window does not pin memory
sized for the largest); requests sharing a window each hold a reference, and the run is free again
when the last one is released. A local client maps a slab once, read-only, and views results without a copy.
Slab names carry the engine's pid and the worker's epoch, so a stale reference never reads new data.
numpy has no bfloat16, so "bfloat16" is stored as uint16 (same size); callers view it with
`torch.from_numpy(array).view(torch.bfloat16)`.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vitserve.checks import check_int

from .sealed import create_sealed

PREFIX = "vitserve"
SLOT_ALIGNMENT = max(4096, mmap.PAGESIZE)  # page sizes are powers of two, so always a multiple of 4096
MAX_OWNER_LENGTH = 64  # keeps a slab name far below the 255-byte file name limit
_OWNER = re.compile(r"[A-Za-z0-9_]+")
# No leading zeros: a name parses only if it is exactly the name this module would create.
_SLAB_NAME = re.compile(rf"{PREFIX}-([1-9][0-9]*)-([A-Za-z0-9_]+)-e(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")


class SlabError(Exception):
    """A slot or slab reference that cannot be used; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Slot:
    index: int  # global index of the first slot within the pool (0 .. total_slots-1)
    slab: str  # file name (not path) of the slab holding it
    epoch: int
    offset: int  # byte offset of the slot inside that slab
    count: int = 1  # consecutive slots leased together

    def __str__(self) -> str:
        run = f"slots {self.index}-{self.index + self.count - 1}" if self.count > 1 else f"slot {self.index}"
        return f"{run} (slab {self.slab}, epoch {self.epoch}, offset {self.offset})"


def parse_slab_name(name: str) -> tuple[int, str, int, int] | None:
    """(pid, owner, epoch, index) of a vitserve slab file name, or None for any other name."""
    match = _SLAB_NAME.fullmatch(name)
    if match is None:
        return None
    pid, owner, epoch, index = match.groups()
    return int(pid), owner, int(epoch), int(index)


_STORAGE = {name: np.dtype(name) for name in ("uint8", "uint16", "float16", "float32", "int32", "int64")}
_STORAGE["bfloat16"] = np.dtype(np.uint16)


def numpy_dtype(name: str | np.dtype | type) -> np.dtype:
    """The numpy dtype for `name`; "bfloat16" becomes uint16 storage (view it as torch.bfloat16)."""
    if isinstance(name, str) and name in _STORAGE:
        return _STORAGE[name]
    try:
        dtype = np.dtype(name) if name is not None else None  # np.dtype(None) would mean float64
    except TypeError:
        dtype = None
    if dtype is None or dtype.hasobject:
        raise SlabError(f"unsupported dtype {name!r}: use a numeric numpy dtype such as 'float32', or 'bfloat16'")
    return dtype


def view_array(mapping: mmap.mmap, offset: int, shape: int | tuple[int, ...], dtype: str | np.dtype,
          limit: int, where: str) -> np.ndarray:
    """A numpy view of `shape` `dtype` at `offset`; SlabError unless it ends by byte `limit`."""
    try:
        dims = tuple(operator.index(d) for d in shape) if hasattr(shape, "__iter__") else (operator.index(shape),)
    except TypeError:
        dims = (-1,)
    if any(d < 0 for d in dims):
        raise SlabError(f"invalid shape {shape!r}: pass a tuple of non-negative integers")
    element = numpy_dtype(dtype)
    nbytes = math.prod(dims) * element.itemsize
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + nbytes > limit:
        raise SlabError(f"{nbytes} bytes of shape {dims} {dtype} at offset {offset} do not fit {where}")
    # np.frombuffer keeps a buffer export on the mmap while the array lives, so the mmap cannot be
    # closed under it; np.ndarray(buffer=...) keeps none and would dangle after close.
    return np.frombuffer(mapping, dtype=element, count=math.prod(dims), offset=offset).reshape(dims)


def close_unless_exported(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        pass  # views handed out still export it; they keep it alive and it is unmapped after the last one goes


def slab_plan(owner: str, slot_bytes: int, slots: int, epoch: int = 0,
              slots_per_slab: int | None = None) -> list[tuple[str, int]]:
    """(name, bytes) of each slab of a pool: what the pool's worker is asked to make."""
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner) or len(owner) > MAX_OWNER_LENGTH:
        raise ValueError(f"owner must be 1-{MAX_OWNER_LENGTH} letters, digits or _ like 'w0', got {owner!r}")
    check_int("slot_bytes", slot_bytes, 1, "pass the largest window output in bytes")
    check_int("slots", slots, 1, "pass how many windows may hold outputs at once")
    if slots_per_slab is not None:
        check_int("slots_per_slab", slots_per_slab, 1, "or pass None to put all slots in one slab")
    check_int("epoch", epoch, 0, "increase it on every worker restart")
    aligned, per_slab = _slot_layout(slot_bytes, slots, slots_per_slab)
    return [(f"{PREFIX}-{os.getpid()}-{owner}-e{epoch}-{i}", min(per_slab, slots - first) * aligned)
            for i, first in enumerate(range(0, slots, per_slab))]


def _slot_layout(slot_bytes: int, slots: int, slots_per_slab: int | None) -> tuple[int, int]:
    """(bytes of a slot rounded up to whole pages, slots per slab)."""
    return -(-slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT, min(slots_per_slab or slots, slots)


def _close_slabs(descriptors: list[int], maps: list[mmap.mmap]) -> None:
    for fd in descriptors:
        os.close(fd)
    descriptors.clear()
    for mapping in maps:
        close_unless_exported(mapping)
    maps.clear()


class SlabPool:
    """The engine's side: the slabs' read-only descriptors, and the leases of their slots.

    `descriptors`: read-only descriptors of slabs made elsewhere as `slab_plan` says (by the worker,
    which alone writes them); the pool owns them. None: the pool makes its slabs here and keeps
    their writable mappings (for a process that writes its own outputs, and for tests)."""

    def __init__(self, owner: str, slot_bytes: int, slots: int, epoch: int = 0,
                 slots_per_slab: int | None = None, descriptors: Sequence[int] | None = None):
        plan = slab_plan(owner, slot_bytes, slots, epoch, slots_per_slab)
        self.owner, self.epoch, self.total_slots = owner, epoch, slots
        self.slot_bytes, self.slots_per_slab = _slot_layout(slot_bytes, slots, slots_per_slab)
        self.names = [name for name, _ in plan]
        self._refcounts = [0] * slots  # per leased run, at its first slot
        self._runs: dict[int, int] = {}  # first slot of each leased run -> its length
        self._lock = threading.Lock()  # releases may arrive on another thread than acquires
        self._descriptors: list[int] = []  # read-only, one per slab
        self._maps: list[mmap.mmap] = []  # writable, only when the slabs were made here
        # Closes on close(), on garbage collection and at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _close_slabs, self._descriptors, self._maps)
        if descriptors is not None:
            if len(descriptors) != len(plan):
                raise SlabError(f"{len(descriptors)} slab descriptors for a pool of {len(plan)} slabs")
            self._descriptors.extend(descriptors)
            return
        try:
            for name, size in plan:
                fd, mapping = create_sealed(name, size)
                self._descriptors.append(fd)
                self._maps.append(mapping)
        except BaseException:
            self._finalizer()  # none of the slabs made so far stays
            raise

    def __enter__(self) -> SlabPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the slabs (idempotent); their memory goes when the last mapping of them does."""
        self._finalizer()

    def descriptor(self, slab: str) -> int | None:
        """The read-only descriptor of the pool's slab `slab` (not a copy), None for any other name."""
        try:
            index = self.names.index(slab)
        except ValueError:
            return None
        return self._descriptors[index] if self._finalizer.alive else None

    def _check(self, slot: Slot | None) -> None:
        if not self._finalizer.alive:
            raise SlabError(f"the pool of {self.names[0]} is closed: create a new pool")
        if slot is None:
            return
        if slot.epoch != self.epoch:
            raise SlabError(f"{slot} is from epoch {slot.epoch} but this pool is epoch {self.epoch}: "
                            "the reference predates a worker restart; drop it")
        if not 0 <= slot.index < self.total_slots or self._slot(slot.index, slot.count) != slot:
            raise SlabError(f"{slot} does not belong to this pool: pass slots acquired from it")

    def _slot(self, index: int, count: int = 1) -> Slot:
        slab, position = divmod(index, self.slots_per_slab)
        return Slot(index, self.names[slab], self.epoch, position * self.slot_bytes, count)

    def acquire(self, count: int = 1) -> Slot | None:
        """`count` consecutive free slots in one slab with one reference, lowest index first (first fit
        keeps the touched memory compact); None when no such run is free."""
        check_int("count", count, 1, "pass how many consecutive slots the window needs")
        with self._lock:
            self._check(None)
            start = self._first_free_run(count)
            if start is None:
                return None
            self._runs[start] = count
            self._refcounts[start] = 1
        return self._slot(start, count)

    def _free_gaps(self):
        """(first slot, length) of every free run, slab by slab, in index order. Walks the leased runs,
        which are few (about one per window whose outputs are still read), not the slots."""
        leased = sorted(self._runs.items())
        position = 0
        for slab_start in range(0, self.total_slots, self.slots_per_slab):
            slab_end = min(slab_start + self.slots_per_slab, self.total_slots)
            cursor = slab_start
            while position < len(leased) and leased[position][0] < slab_end:
                start, length = leased[position]
                if start > cursor:
                    yield cursor, start - cursor
                cursor = start + length
                position += 1
            if slab_end > cursor:
                yield cursor, slab_end - cursor

    def _first_free_run(self, count: int) -> int | None:
        return next((start for start, length in self._free_gaps() if length >= count), None)

    def largest_free_run(self) -> int:
        """The most consecutive free slots within one slab: the largest window that fits now."""
        with self._lock:
            return max((length for _, length in self._free_gaps()), default=0)

    def hold(self, slot: Slot, count: int = 1) -> None:
        """Add `count` references (one per further request reading the slot)."""
        check_int("count", count, 1, "pass how many references to add")
        with self._lock:
            self._check_held(slot, "acquire a slot before holding it")
            self._refcounts[slot.index] += count

    def release(self, slot: Slot) -> bool:
        """Drop one reference; True when the run became free."""
        with self._lock:
            self._check_held(slot, "release each reference exactly once")
            self._refcounts[slot.index] -= 1
            if self._refcounts[slot.index] > 0:
                return False
            del self._runs[slot.index]
            return True

    def refcount(self, slot: Slot) -> int:
        self._check(slot)
        return self._refcounts[slot.index]

    def free_slots(self) -> int:
        with self._lock:
            return self.total_slots - sum(self._runs.values())

    def _check_held(self, slot: Slot, advice: str) -> None:
        self._check(slot)
        if self._refcounts[slot.index] == 0 or self._runs.get(slot.index) != slot.count:
            raise SlabError(f"{slot} is not held (it is free): {advice}")

    def _held_mapping(self, slot: Slot) -> mmap.mmap:
        self._check_held(slot, "acquire it before writing")
        if not self._maps:
            raise SlabError(f"the slabs of {self.names[0]} were made by their worker, which alone writes them")
        return self._maps[slot.index // self.slots_per_slab]

    def buffer(self, slot: Slot) -> memoryview:
        """A writable view of the run's bytes (count * slot_bytes)."""
        return memoryview(self._held_mapping(slot))[slot.offset:slot.offset + slot.count * self.slot_bytes]

    def array(self, slot: Slot, shape: int | tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
        """A writable numpy view at the slot's start."""
        mapping = self._held_mapping(slot)
        size = slot.count * self.slot_bytes
        where = f"in {slot} of {size} bytes: acquire more slots, or create the pool with a larger slot_bytes"
        return view_array(mapping, slot.offset, shape, dtype, slot.offset + size, where)
