"""A local client's input arena: shared memory it writes its inputs into, which the engine's workers
read in place (ipc/input_slabs.py), so no pixel crosses the socket.

The engine offers one per connection (a token in its welcome); the client asks for it over the
slab channel as soon as it is welcomed, off the event loop (requests meanwhile go as frames), and lays each request's arrays out in one range, freed when
the request ends. A request that does not fit (or a connection without an arena) sends its arrays
as frames, as a tcp:// client does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import numpy as np

from vitserve.ipc.input_slabs import InputSlab, Regions, aligned
from vitserve.ipc.slab_channel import ask_for_arena
from vitserve.ipc.slabs import SlabError

log = logging.getLogger(__name__)


class ClientArena:
    def __init__(self, channel: str, token: str):
        self._channel, self._token = channel, token
        self._slab: InputSlab | None = None
        self._regions: Regions | None = None
        self._refused = not token  # no arena offered, or the ask failed: frames for this connection

    def place(self, arrays: Sequence[np.ndarray]) -> tuple[int, list[int]] | None:
        """Write the arrays into the arena, adjacent: (the range's start, each array's offset), or
        None when they go as frames (no arena, or not enough room now)."""
        if self._regions is None:
            return None
        sizes = [aligned(array.nbytes) for array in arrays]
        start = self._regions.take(sum(sizes))
        if start is None:
            return None
        offsets, offset = [], start
        for array, size in zip(arrays, sizes):
            np.copyto(self._slab.array(offset, array.dtype.name, array.shape, writable=True), array, casting="no")
            offsets.append(offset)
            offset += size
        return start, offsets

    def give(self, start: int) -> None:
        """The request whose arrays start at `start` ended: its range is free again."""
        if self._regions is not None:
            self._regions.give(start)

    async def open(self) -> None:
        """Ask the engine for the arena, in a thread: a slow or stopped engine must not hold up the
        client's event loop. Without one (refused, or out of reach), requests go as frames."""
        if self._refused:
            return
        try:
            name, fd = await asyncio.get_running_loop().run_in_executor(None, ask_for_arena, self._channel, self._token)
            slab = InputSlab.open(fd, name)
        except (OSError, ValueError, SlabError) as err:
            log.info("no input arena (%s): inputs go as frames", err)
            self._refused = True
            return
        if self._refused:  # closed while it was asked for (its connection was lost)
            slab.close()
            return
        self._slab, self._regions = slab, Regions(slab.size)

    def close(self) -> None:
        if self._slab is not None:
            self._slab.close()
        self._slab = self._regions = None
        self._refused = True
