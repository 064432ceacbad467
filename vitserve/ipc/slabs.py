"""Output slabs in shared memory: a worker writes each window's rows once, local clients read them in place.

This module names slabs and leases their slots (the engine's side); `slab_maps` maps them by name
in the worker (writable) and in clients (read-only).

A worker owns files in /dev/shm ("slabs") cut into page-aligned slots. The engine leases a run of
consecutive slots per encoder window, as many as its rows need (a small window does not pin memory
sized for the largest); requests sharing a window each hold a reference, and the run is free again
when the last one is released. A local client maps a slab once, read-only, and views results without a copy.
Slab names carry the creating pid and the worker's epoch, so a stale reference never reads new data.
Not multiprocessing.shared_memory: its resource tracker unlinks (or warns about) segments that another
process merely attached to. numpy has no bfloat16, so "bfloat16" is stored as uint16 (same size);
callers view it with `torch.from_numpy(array).view(torch.bfloat16)`.
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
from pathlib import Path

import numpy as np

from vitserve.checks import check_int

SHM_DIR = Path("/dev/shm")
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


def _discard_slabs(paths: list[Path], maps: list[mmap.mmap], creator_pid: int) -> None:
    if os.getpid() != creator_pid:
        return  # a forked child inherited the pool object; the files belong to the parent
    for path in paths:
        path.unlink(missing_ok=True)
    for mapping in maps:
        close_unless_exported(mapping)
    maps.clear()


class SlabPool:
    """Owner side (lives in the engine/worker that writes outputs): creates the slabs and leases slots."""

    def __init__(self, owner: str, slot_bytes: int, slots: int, epoch: int = 0,
                 slots_per_slab: int | None = None, directory: Path = SHM_DIR):
        if not isinstance(owner, str) or not _OWNER.fullmatch(owner) or len(owner) > MAX_OWNER_LENGTH:
            raise ValueError(f"owner must be 1-{MAX_OWNER_LENGTH} letters, digits or _ like 'w0', got {owner!r}")
        check_int("slot_bytes", slot_bytes, 1, "pass the largest window output in bytes")
        check_int("slots", slots, 1, "pass how many windows may hold outputs at once")
        if slots_per_slab is not None:
            check_int("slots_per_slab", slots_per_slab, 1, "or pass None to put all slots in one slab")
        check_int("epoch", epoch, 0, "increase it on every worker restart")
        self.owner, self.epoch, self.total_slots, self.directory = owner, epoch, slots, Path(directory)
        self.slot_bytes = -(-slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.slots_per_slab = min(slots_per_slab or slots, slots)
        slab_count = -(-slots // self.slots_per_slab)
        self.names = [f"{PREFIX}-{os.getpid()}-{owner}-e{epoch}-{i}" for i in range(slab_count)]
        self._refcounts = [0] * slots  # per leased run, at its first slot
        self._runs: dict[int, int] = {}  # first slot of each leased run -> its length
        self._lock = threading.Lock()  # releases may arrive on another thread than acquires
        self._paths: list[Path] = []
        self._maps: list[mmap.mmap] = []
        # Unlinks on close(), on garbage collection and at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _discard_slabs, self._paths, self._maps, os.getpid())
        try:
            for i, name in enumerate(self.names):
                slots_here = min(self.slots_per_slab, slots - i * self.slots_per_slab)
                self._maps.append(self._create(self.directory / name, slots_here * self.slot_bytes))
        except BaseException:
            self._finalizer()  # leave none of the slabs created so far behind
            raise

    def _create(self, path: Path, size: int) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise SlabError(f"slab {path} already exists: close the other pool of owner {self.owner!r} "
                            f"epoch {self.epoch}, or choose another owner label or epoch") from None
        self._paths.append(path)
        try:
            os.ftruncate(fd, size)
            # Reserve the memory now: a sparse tmpfs file that runs out of space would kill the
            # writer with SIGBUS in the middle of serving instead of failing here at start.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            return mmap.mmap(fd, size)  # shared, read-write
        except OSError as error:
            raise SlabError(f"cannot create slab {path} of {size} bytes ({error.strerror}): free space in "
                            f"{self.directory} (e.g. a larger --shm-size) or ask for fewer or smaller slots") from error
        finally:
            os.close(fd)  # the mapping holds its own descriptor

    def __enter__(self) -> SlabPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Unlink and unmap every slab (idempotent); views still alive keep their memory until collected."""
        self._finalizer()

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
