"""When queued requests can no longer meet their deadlines, without scanning the queue at every poll.

A request is hopeless once one of its queued items, run alone on the fastest worker, would end
after the deadline: at `deadline - alone_ms` of its slowest queued item. Each request with a
deadline has an entry in a heap at that time. A due entry is checked against the items still
queued: hopeless requests are returned; one whose slowest item has left for a worker meanwhile is
entered again at the later time its remaining items give. Entries of requests no longer queued go
when they come due, or when the heap is rebuilt (it never holds more than twice the queue's items).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Iterable

from .queue import QueuedItem, Request, RequestQueue

SPARE_ENTRIES = 64  # entries beyond twice the queue before the heap is rebuilt


class DoomClock:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []  # (hopeless from, tie-break, request key)
        self._ties = itertools.count()

    def watch(self, items: Iterable[QueuedItem]) -> None:
        """Enter the requests of `items` (just queued, or queued again)."""
        doom: dict[int, float] = {}
        for item in items:
            if math.isfinite(item.request.deadline):
                at = item.request.deadline - item.alone_ms / 1e3
                doom[item.request.key] = min(at, doom.get(item.request.key, math.inf))
        for key, at in doom.items():
            heapq.heappush(self._heap, (at, next(self._ties), key))

    def due(self, now: float, queue: RequestQueue) -> list[Request]:
        """The queued requests that cannot meet their deadlines any more (each once)."""
        hopeless: dict[int, Request] = {}
        later: list[QueuedItem] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            items = queue.of_request(key) if key not in hopeless else []
            if not items:
                continue  # its items all left (dispatched, failed or cancelled) or it was found already
            if any(now >= item.request.deadline - item.alone_ms / 1e3 for item in items):
                hopeless[key] = items[0].request
            else:
                later += items  # its slowest item left: the rest is due later
        self.watch(later)
        if len(self._heap) > 2 * len(queue) + SPARE_ENTRIES:
            self._heap = []
            self.watch(queue)
        return list(hopeless.values())

    def next_at(self) -> float:
        """When the earliest entry comes due (inf: none)."""
        return self._heap[0][0] if self._heap else math.inf
