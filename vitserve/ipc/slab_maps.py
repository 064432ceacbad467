"""Slabs mapped read-only by clients, which view results in place."""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np

from .sealed import SealError, check_sealed
from .slabs import PREFIX, SlabError, close_unless_exported, parse_slab_name, view_array


class SlabReader:
    """Client side: maps slabs read-only, by descriptor, and views results in place.

    `open_slab(name)` returns a descriptor of the slab (the reader closes it once mapped): over the
    engine's slab channel for a client of a served engine, from the pools for an embedded one. The
    descriptor must be a sealed memory file, so no one can truncate the slab under a view (SIGBUS)
    or rewrite it. A mapping is kept while its slab is the newest epoch of its worker in the newest
    engine seen: every worker restart brings slabs of a new epoch, every engine restart a new pid,
    and a long-lived reader would otherwise keep every old one mapped (and its memory alive). This is
    checked when a slab not kept yet is mapped (rare: a new name), never on the path of a read.
    Views already handed out keep their mapping until they go."""

    def __init__(self, open_slab: Callable[[str], int]):
        self._open_slab = open_slab
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
        """Map a slab not kept yet; keep it unless a newer epoch of its worker is kept (then the
        mapping lives only as long as the views taken from it)."""
        parsed = parse_slab_name(slab) if isinstance(slab, str) else None
        if parsed is None:
            raise SlabError(f"{slab!r} is not a vitserve slab name ({PREFIX}-<pid>-<owner>-e<epoch>-<index>): "
                            "pass the slab field of a result unchanged")
        mapped = (self._map(slab), parsed)
        engine, source, epoch = parsed[0], parsed[:2], parsed[2]
        for name in [name for name, (_, kept) in self._maps.items() if kept[0] != engine]:
            self.forget(name)  # an engine started since: the slabs of the one before are gone for good
        same_source = {name: kept[2] for name, (_, kept) in self._maps.items() if kept[:2] == source}
        if any(kept_epoch > epoch for kept_epoch in same_source.values()):
            return mapped  # a result from before a restart: read, not kept
        for name, kept_epoch in same_source.items():
            if kept_epoch < epoch:
                self.forget(name)  # its worker restarted: the old slabs are retired
        self._maps[slab] = mapped
        return mapped

    def _map(self, slab: str) -> mmap.mmap:
        fd = self._open_slab(slab)
        try:
            check_sealed(fd, slab)
            size = os.fstat(fd).st_size
            if size == 0:  # mmap refuses empty files; a slab never is one
                raise SlabError(f"slab {slab} is empty, so it is not a vitserve slab; request the result again")
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except SealError as error:
            raise SlabError(str(error)) from None
        finally:
            os.close(fd)  # the mapping holds its own reference to the file

    def forget(self, slab: str) -> None:
        """Drop the cached mapping of `slab`; views already handed out stay valid."""
        mapped = self._maps.pop(slab, None)
        if mapped is not None:
            close_unless_exported(mapped[0])

    def close(self) -> None:
        for slab in list(self._maps):
            self.forget(slab)
