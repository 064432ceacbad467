"""Slabs mapped by name: read-only by clients, which view results in place, and writable by the
worker that fills them; and the removal of slabs a crashed engine left behind."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from .slabs import PREFIX, SHM_DIR, SlabError, close_unless_exported, parse_slab_name, view_array


def writable_slab(name: str, directory: Path = SHM_DIR, pin: bool = False) -> mmap.mmap:
    """The worker's read-write mapping of a slab the engine created. With `pin`, the pages are
    registered with CUDA (page-locked), so device-to-host copies into them run asynchronously."""
    if parse_slab_name(name) is None:
        raise SlabError(f"{name!r} is not a vitserve slab name ({PREFIX}-<pid>-<owner>-e<epoch>-<index>)")
    path = Path(directory) / name
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise SlabError(f"slab {path} does not exist: the engine removed it or never created it") from None
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if pin:
        import torch

        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        status = torch.cuda.cudart().cudaHostRegister(address, len(mapping), 0)
        if int(status) != 0:
            raise SlabError(f"cudaHostRegister of slab {path} ({len(mapping)} bytes) failed with status {status}")
    return mapping


class SlabReader:
    """Client side: maps slabs by name, read-only, and views results in place.

    A mapping is kept while its slab is the newest epoch of its engine and owner and its file
    exists: every worker restart brings slabs of a new epoch, and a long-lived reader would
    otherwise keep every old one mapped. Both are checked when a slab not kept yet is mapped
    (rare: a new name), never on the path of a read. Views already handed out keep their mapping
    until they go."""

    def __init__(self, directory: Path = SHM_DIR):
        self.directory = Path(directory)
        # slab name -> (mapping, (engine pid, owner, epoch, index) parsed from the name)
        self._maps: dict[str, tuple[mmap.mmap, tuple[int, str, int, int]]] = {}

    def array(self, slab: str, epoch: int, offset: int, shape: int | tuple[int, ...],
              dtype: str | np.dtype) -> np.ndarray:
        """A read-only view of `shape` `dtype` at `offset` in `slab`, mapping the slab on first use."""
        mapped = self._maps.get(slab) if isinstance(slab, str) else None
        if mapped is None:
            mapped = self._map_new(slab)
        mapping, (_, _, slab_epoch, _) = mapped
        if slab_epoch != epoch:
            raise SlabError(f"stale reference: slab {slab} belongs to epoch {slab_epoch}, the reference to epoch "
                            f"{epoch}; the worker restarted, so request the result again")
        where = f"in slab {slab} of {len(mapping)} bytes: pass offset, shape and dtype of the result unchanged"
        return view_array(mapping, offset, shape, dtype, len(mapping), where)

    def _map_new(self, slab: str) -> tuple[mmap.mmap, tuple[int, str, int, int]]:
        """Map a slab not kept yet; keep it unless a newer epoch of its engine and owner is kept
        (then the mapping lives only as long as the views taken from it)."""
        parsed = parse_slab_name(slab) if isinstance(slab, str) else None
        if parsed is None:
            raise SlabError(f"{slab!r} is not a vitserve slab name ({PREFIX}-<pid>-<owner>-e<epoch>-<index>): "
                            "pass the slab field of a result unchanged")
        self._forget_removed()
        mapped = (self._map(self.directory / slab), parsed)
        source, epoch = parsed[:2], parsed[2]
        same_source = {name: kept[2] for name, (_, kept) in self._maps.items() if kept[:2] == source}
        if any(kept_epoch > epoch for kept_epoch in same_source.values()):
            return mapped  # a result from before a restart: read, not kept
        for name, kept_epoch in same_source.items():
            if kept_epoch < epoch:
                self.forget(name)  # its worker restarted: the old slabs are retired
        self._maps[slab] = mapped
        return mapped

    def _forget_removed(self) -> None:
        """Drop the mappings of slabs whose files are gone (their pool closed, their engine exited)."""
        for name in [name for name in self._maps if not (self.directory / name).exists()]:
            self.forget(name)

    @staticmethod
    def _map(path: Path) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SlabError(f"slab {path} does not exist: its worker exited or closed it, so the reference is "
                            "no longer valid; request the result again") from None
        except PermissionError:
            raise SlabError(f"no permission to read slab {path}: run the client as the worker's user") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:  # mmap refuses empty files; a finished slab never is one
                raise SlabError(f"slab {path} is empty, so it is not a vitserve slab; request the result again")
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the mapping holds its own descriptor

    def forget(self, slab: str) -> None:
        """Drop the cached mapping of `slab`; views already handed out stay valid."""
        mapped = self._maps.pop(slab, None)
        if mapped is not None:
            close_unless_exported(mapped[0])

    def close(self) -> None:
        for slab in list(self._maps):
            self.forget(slab)


def remove_stale_slabs(directory: Path = SHM_DIR) -> list[str]:
    """Remove the slabs of processes that no longer exist (e.g. a crashed worker); returns their names.

    Liveness is checked in the caller's pid namespace, so run this where the workers run. A pid
    reused by an unrelated process keeps its old slabs until that process exits too.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        parsed = parse_slab_name(name)
        if parsed is None:
            continue
        try:
            os.kill(parsed[0], 0)  # signal 0 only tests that the process exists
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another cleaner may have got there first
                os.unlink(Path(directory) / name)
                removed.append(name)
        except (PermissionError, OverflowError):
            pass  # another user's live process, or a pid that cannot be tested: leave its files alone
    return removed
