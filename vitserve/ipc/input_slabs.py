"""Input slabs: shared memory that images, videos and patches travel in, from whoever writes them
to the worker's device, with no copy through a socket.

The engine makes every input slab: one of its own, which the frontend copies received frames into
(tcp:// clients, the embedded API, a local client whose own slab is full), and one per local
client connection that asks for it (its *arena*, over the slab channel), which that client alone
writes. Each worker maps every live slab once and registers it with CUDA (page-locked), so a
window's pixels go to the device in one asynchronous copy per run of adjacent items, and the worker
never allocates pinned memory per window.

A slab is a memfd sealed against shrinking and growing (a truncated file would kill the workers
that read it with SIGBUS) but not against writes: its writer keeps writing. A client can only
name offsets of its own arena, so it can change nothing but its own inputs. `Regions` hands out
byte ranges of a slab: the engine's for its own slab, each client's for its arena.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os

import numpy as np

from .sealed import SealError, open_held
from .slabs import PREFIX, SlabError, close_unless_exported, numpy_dtype

INPUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ALIGNMENT = 64  # every region starts on a cache line: float32 patches and DMA both like it


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def input_slab_name(engine_pid: int, owner: str, serial: int) -> str:
    return f"{PREFIX}-{engine_pid}-{owner}-in{serial}"


class InputSlab:
    """One input slab mapped read-write in this process (the engine that made it, the client whose
    arena it is, or a worker that reads it)."""

    def __init__(self, name: str, fd: int, mapping: mmap.mmap):
        self.name = name
        self.fd = fd  # kept open by the engine (workers open their own through /proc); -1 elsewhere
        self.mapping = mapping
        self.size = len(mapping)

    @classmethod
    def create(cls, name: str, size: int) -> InputSlab:
        """A new slab of `size` bytes. Its pages are not reserved: a worker on a GPU page-locks them
        when it maps the slab; elsewhere only what is written takes memory."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, INPUT_SEALS)
            return cls(name, fd, mmap.mmap(fd, size))
        except OSError as error:
            os.close(fd)
            raise SlabError(f"cannot make input slab {name} of {size} bytes ({error.strerror or error}): free "
                            f"memory, or lower input_slab_bytes / input_arena_bytes") from error

    @classmethod
    def open(cls, fd: int, name: str) -> InputSlab:
        """Map the slab behind `fd` (which this call closes): SlabError unless it is a memory file
        sealed against size changes, so that no one can truncate it under its readers."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & INPUT_SEALS != INPUT_SEALS:
                raise SlabError(f"input slab {name} lacks seals (has {seals:#x}, needs {INPUT_SEALS:#x}): it could "
                                f"be truncated under its readers, so it is not used")
            size = os.fstat(fd).st_size
            if size == 0:
                raise SlabError(f"input slab {name} is empty")
            return cls(name, -1, mmap.mmap(fd, size))
        except OSError as error:
            raise SlabError(f"input slab {name} cannot be mapped ({error.strerror or error})") from error
        finally:
            os.close(fd)

    @classmethod
    def open_from(cls, pid: int, fd: int, name: str, size: int) -> InputSlab:
        """Map the slab `name` that process `pid` (the engine) holds as `fd`, through /proc; SlabError
        unless it is exactly that slab (a descriptor number may have been reused)."""
        try:
            opened = open_held(pid, fd, name, os.O_RDWR)
        except SealError as error:
            raise SlabError(str(error)) from None
        slab = cls.open(opened, name)
        if slab.size != size:
            slab.close()
            raise SlabError(f"input slab {name} has {slab.size} bytes, not {size}")
        return slab

    def array(self, offset: int, dtype: str, shape: tuple[int, ...], writable: bool = False) -> np.ndarray:
        """The `shape` `dtype` array at `offset`; SlabError when it does not lie inside the slab."""
        dtype_ = numpy_dtype(dtype)
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype_.itemsize
        if offset < 0 or offset % dtype_.itemsize or offset + nbytes > self.size:
            raise SlabError(f"{nbytes} bytes at offset {offset} do not lie inside input slab {self.name} of "
                            f"{self.size} bytes (or are not aligned to {dtype_.itemsize} bytes)")
        array = np.frombuffer(self.mapping, dtype=dtype_, count=count, offset=offset).reshape(shape)
        if not writable:
            array.flags.writeable = False
        return array

    def close(self) -> None:
        close_unless_exported(self.mapping)  # views still in use keep their pages until they go
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Regions:
    """First-fit allocation of aligned byte ranges of one slab; freed neighbours merge."""

    def __init__(self, size: int):
        self.size = size
        self._free_starts = [0]  # sorted starts of free ranges
        self._free = {0: size}  # start -> length
        self._used: dict[int, int] = {}  # start -> length
        self.free_bytes = size

    def take(self, nbytes: int) -> int | None:
        """The start of a free range of at least `nbytes`, now taken; None when none is free."""
        length = aligned(max(nbytes, 1))
        for start in self._free_starts:
            have = self._free[start]
            if have >= length:
                del self._free[start]
                self._free_starts.remove(start)
                if have > length:
                    self._add_free(start + length, have - length)
                self._used[start] = length
                self.free_bytes -= length
                return start
        return None

    def give(self, start: int) -> None:
        """Free the range taken at `start` (taken ranges only; KeyError otherwise)."""
        length = self._used.pop(start)
        self.free_bytes += length
        index = bisect.bisect_left(self._free_starts, start)
        after = start + length
        if index < len(self._free_starts) and self._free_starts[index] == after:  # merge the next
            length += self._free.pop(after)
            self._free_starts.pop(index)
        if index > 0:
            before = self._free_starts[index - 1]
            if before + self._free[before] == start:  # merge into the previous
                self._free[before] += length
                return
        self._add_free(start, length)

    def _add_free(self, start: int, length: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free[start] = length
