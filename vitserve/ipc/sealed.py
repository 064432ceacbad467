"""Slabs as sealed memory files: the one process that writes them maps them writable before anyone
else can open them, and from then on the kernel refuses every other way to change them.

A slab is a memfd (anonymous shared memory, gone with its last descriptor and mapping; nothing
in /dev/shm for anyone to open by name, truncate or leave behind). Its maker maps it writable and
then adds seals: no shrinking or growing (a truncated file would kill its readers with SIGBUS), no
new writable mapping and no write() (F_SEAL_FUTURE_WRITE: the maker's mapping stays writable), and
no further seals. The process is not dumpable while it makes them, so that no other process of
the same user can open the file through /proc/<pid>/fd before the seals are on (the kernel lets
only the process itself in then). Readers get read-only descriptors and check the seals.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from contextlib import contextmanager
from typing import Callable

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1; Python has no name for it before 3.12
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4


class SealError(Exception):
    """A slab that cannot be made, or a descriptor that is not a sealed slab; the message says why."""


def create_sealed(name: str, size: int, prepare: Callable[[mmap.mmap], None] | None = None) -> tuple[int, mmap.mmap]:
    """A memfd called `name` of `size` bytes, reserved, sealed: (a read-only descriptor of it, the
    one writable mapping it will ever have). `prepare(mapping)` runs before the seals (e.g. to
    register the pages with CUDA)."""
    with _not_dumpable():
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Reserve the memory now: a sparse file that runs out of memory would kill its writer
            # with SIGBUS in the middle of serving instead of failing here at start.
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)  # shared, read-write: made before the seals forbid it
            if prepare is not None:
                prepare(mapping)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as error:
            os.close(fd)
            raise SealError(f"cannot make slab {name} of {size} bytes ({error.strerror or error}): free memory "
                            f"(or raise the memory limit), or ask for fewer or smaller output windows") from error
        except BaseException:
            os.close(fd)
            raise
    try:
        return reopen_read_only(os.getpid(), fd, name, size), mapping
    finally:
        os.close(fd)  # the read-only descriptor and the mapping keep the file


def reopen_read_only(pid: int, fd: int, name: str, size: int) -> int:
    """A read-only descriptor of the sealed slab `name` that process `pid` holds as `fd`; SealError
    unless it is exactly that (name, size and seals), so a reused descriptor number is never mistaken."""
    reopened = open_held(pid, fd, name, os.O_RDONLY)
    try:
        check_sealed(reopened, name)
        if os.fstat(reopened).st_size != size:
            raise SealError(f"slab {name} has {os.fstat(reopened).st_size} bytes, not {size}")
    except BaseException:
        os.close(reopened)
        raise
    return reopened


def open_held(pid: int, fd: int, name: str, flags: int) -> int:
    """Open (with `flags`) the memory file `name` that process `pid` holds as `fd`, through /proc;
    SealError unless it is that file (a descriptor number may have been reused)."""
    where = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(where)
        if target != f"/memfd:{name} (deleted)":
            raise SealError(f"{where} is {target!r}, not the slab {name}")
        return os.open(where, flags | os.O_CLOEXEC)
    except OSError as error:
        raise SealError(f"cannot open slab {name} as {where} ({error.strerror or error})") from error


def check_sealed(fd: int, name: str) -> None:
    """SealError unless `fd` is a memory file with every seal a slab must carry."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as error:
        raise SealError(f"slab {name} is not a sealed memory file ({error.strerror}): it could be truncated or "
                        f"rewritten under its readers, so it is not read") from error
    if seals & SEALS != SEALS:
        raise SealError(f"slab {name} lacks seals (has {seals:#x}, needs {SEALS:#x}): it could be truncated or "
                        f"rewritten under its readers, so it is not read")


@contextmanager
def _not_dumpable():
    libc = ctypes.CDLL(None, use_errno=True)
    before = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SealError(f"prctl(PR_SET_DUMPABLE) failed ({os.strerror(ctypes.get_errno())}): slabs cannot be made "
                        f"safely here")
    try:
        yield
    finally:
        if before == 1:  # 0 stays 0; 2 (suid_dumpable) cannot be set back by prctl, and 0 is the safer
            libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
