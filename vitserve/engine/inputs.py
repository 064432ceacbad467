"""The engine's input slabs (ipc/input_slabs.py): its own, and the arenas of local clients.

Every item a worker runs lies in an input slab. Items that came as frames (tcp:// clients, the
embedded API, a local client whose arena was full) are copied into the engine's own slab when the
request is queued, in one range per request, given back when the request ends. A local client's
arena is made when it asks for it (at most `max_input_arenas` at once) and dropped when its
connection closes; its items are used where the client wrote them.

Workers map every live slab: each one as it is made, all of them when a worker (re)starts. A
dropped arena is unmapped by each worker once the windows it was sent before are done (they may
still be copying from it); the engine closes its descriptor when every worker has said so, or is gone.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np

from vitserve.ipc.input_slabs import InputSlab, Regions, aligned, input_slab_name
from vitserve.ipc.worker_messages import DropInputs, MapInputs
from vitserve.ipc.slabs import SlabError

from .admission import AdmittedItem
from .errors import EngineError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Dropping:
    slab: InputSlab
    waiting: set[int] = field(default_factory=set)  # workers that have not unmapped it yet


class EngineInputs:
    def __init__(self, instance: int, own_bytes: int, arena_bytes: int, max_arenas: int,
                 send: Callable[[int, object], bool], workers: Callable[[], Iterable[int]]):
        """`send(worker, message)`: to a worker, False when it is gone; `workers()`: those that map slabs now."""
        self._owner = f"n{instance}"
        self._serials = itertools.count()
        self.own = InputSlab.create(self._name(), own_bytes)
        self.regions = Regions(own_bytes)
        self.arena_bytes = arena_bytes
        self.max_arenas = max_arenas
        self.arenas: dict[str, InputSlab] = {}
        self._dropping: dict[str, _Dropping] = {}
        self._send = send
        self._workers = workers
        self.arenas_refused = 0

    def _name(self) -> str:
        return input_slab_name(os.getpid(), self._owner, next(self._serials))

    # -- the engine's own slab ---------------------------------------------------------------
    def place(self, items: list[AdmittedItem]) -> tuple[list[AdmittedItem], int | None]:
        """The items, each in an input slab: those not in one yet are copied into the engine's own
        slab, adjacent, in one range (its start is returned, for `give_back`; None when no copy was
        needed). EngineError `overloaded` while the slab is too full, `too_large` when it always is."""
        loose = [i for i, item in enumerate(items) if not item.slab]
        if not loose:
            return items, None
        sizes = [aligned(items[i].array.nbytes) for i in loose]
        total = sum(sizes)
        start = self.regions.take(total)
        if start is None:
            if total > self.regions.size:
                raise EngineError("too_large", f"the request's inputs take {total} bytes, more than the engine's "
                                               f"input slab of {self.regions.size} (input_slab_bytes): split it")
            raise EngineError("overloaded", f"the engine's input slab has {self.regions.free_bytes} bytes free in "
                                            f"pieces, too few for the request's {total} (input_slab_bytes): retry "
                                            f"shortly", 100.0)
        placed, offset = list(items), start
        for i, size in zip(loose, sizes):
            item = items[i]
            target = self.own.array(offset, item.array.dtype.name, item.array.shape, writable=True)
            np.copyto(target, item.array, casting="no")
            target.flags.writeable = False
            placed[i] = replace(item, array=target, slab=self.own.name, offset=offset)
            offset += size
        return placed, start

    def give_back(self, start: int) -> None:
        self.regions.give(start)

    # -- arenas --------------------------------------------------------------------------------
    def new_arena(self) -> InputSlab:
        """A new arena, mapped by every worker from now on; SlabError saying why there is none."""
        if not self.arena_bytes:
            raise SlabError("this engine gives no input arenas (input_arena_bytes=0): send inputs as frames")
        if len(self.arenas) >= self.max_arenas:
            self.arenas_refused += 1
            raise SlabError(f"all {self.max_arenas} input arenas are in use (max_input_arenas): inputs go as frames")
        arena = InputSlab.create(self._name(), self.arena_bytes)
        self.arenas[arena.name] = arena
        for worker in self._workers():
            self._send(worker, MapInputs(arena.name, arena.fd, arena.size))
        return arena

    def arena_array(self, name: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only view of an array in a live arena; SlabError when it is not inside it."""
        arena = self.arenas.get(name)
        if arena is None:
            raise SlabError("this connection has no input arena: ask for one over the slab channel, or send the "
                            "array as a frame")
        return arena.array(offset, dtype, shape)

    def drop_arena(self, name: str) -> None:
        """The arena's connection closed: every worker unmaps it, then it is closed."""
        arena = self.arenas.pop(name, None)
        if arena is None:
            return
        dropping = _Dropping(arena)
        for worker in self._workers():
            if self._send(worker, DropInputs(name)):
                dropping.waiting.add(worker)
        self._dropping[name] = dropping
        self._close_if_unmapped(name)

    def dropped(self, worker: int, name: str) -> None:
        """Worker `worker` has unmapped slab `name`."""
        dropping = self._dropping.get(name)
        if dropping is not None:
            dropping.waiting.discard(worker)
            self._close_if_unmapped(name)

    def worker_gone(self, worker: int) -> None:
        """A lost worker's mappings went with it."""
        for name in list(self._dropping):
            self.dropped(worker, name)

    def _close_if_unmapped(self, name: str) -> None:
        if not self._dropping[name].waiting:
            self._dropping.pop(name).slab.close()

    # -- workers -----------------------------------------------------------------------------------
    def map_all(self, worker: int) -> None:
        """A worker that (re)started maps every live slab."""
        for slab in (self.own, *self.arenas.values()):
            self._send(worker, MapInputs(slab.name, slab.fd, slab.size))

    def stats(self) -> dict[str, float]:
        return {"input_slab_free_bytes": float(self.regions.free_bytes), "input_arenas": float(len(self.arenas)),
                "input_arenas_refused": float(self.arenas_refused)}

    def close(self) -> None:
        for slab in (self.own, *self.arenas.values(), *(d.slab for d in self._dropping.values())):
            slab.close()
        self.arenas.clear()
        self._dropping.clear()
