"""The request queue: items of admitted requests, ordered by priority, then earliest
deadline, then arrival, and bounded in items and tokens.

Items rather than requests are queued because a request's items may land in different
windows (twenty images may fill two); the request completes when all of them have.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

MAX_OWNERS = 4096  # owners remembered before those with nothing queued ahead are forgotten


def deadline_at(arrival: float, deadline_ms: float | None) -> float:
    """Absolute deadline on the scheduler's clock for a relative one (None: no deadline)."""
    return math.inf if deadline_ms is None else arrival + deadline_ms / 1e3


@dataclass(eq=False)
class Request:
    """The scheduler's view of a request. `deadline` is absolute on the scheduler's clock (inf: none)."""

    key: int  # engine-wide id
    priority: int  # lower first
    deadline: float
    arrival: float
    shapes: Sequence[tuple[int, int]]  # (patch tokens, attention sequences) per item
    owner: int = 0  # the client it came from: clients take fair turns within a priority and deadline
    rows: Sequence[int] = ()  # output rows per item (empty: tokens / merge factor; a Kimi chunk has fewer)
    unfinished: int = field(init=False)  # items whose window has not completed

    def __post_init__(self) -> None:
        self.unfinished = len(self.shapes)


@dataclass(eq=False)
class QueuedItem:
    request: Request
    index: int
    tokens: int
    sequences: int
    order: tuple[int, float, float, int, int]  # (priority, deadline, fair start, arrival number, index)
    alone_ms: float = 0.0  # predicted time of this item's own window, for early deadline failure
    lost: int = 0  # windows holding it that a worker lost (it is retried once)
    rows: int = 0  # its output rows (0: tokens / merge factor)

    @property
    def square_tokens(self) -> int:
        """Sum of squared segment lengths: the item's segments are its equal temporal slices."""
        return self.tokens * self.tokens // self.sequences


class RequestQueue:
    """Ordered by priority, then deadline, then fair start: start-time fair queuing over tokens.
    Each owner's requests start, in virtual tokens, where its previous one finished, or at the
    start of the latest dispatched item if that is later; so an owner that queued a long backlog
    takes turns with one that sends a single request now, instead of going ahead of it."""

    def __init__(self) -> None:
        self._items: list[QueuedItem] = []
        self._arrivals = itertools.count()
        self.tokens = 0
        self.virtual_now = 0.0  # fair start of the latest dispatched item
        self._virtual_finish: dict[int, float] = {}  # owner -> where its next request starts

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[QueuedItem]:
        return iter(self._items)

    def add(self, request: Request) -> list[QueuedItem]:
        number = next(self._arrivals)
        deadline = request.deadline if math.isfinite(request.deadline) else math.inf
        start = max(self._virtual_finish.get(request.owner, 0.0), self.virtual_now)
        if len(self._virtual_finish) >= MAX_OWNERS:  # owners with nothing ahead of now need no entry
            self._virtual_finish = {o: f for o, f in self._virtual_finish.items() if f > self.virtual_now}
        self._virtual_finish[request.owner] = start + sum(tokens for tokens, _ in request.shapes)
        added = []
        for index, (tokens, sequences) in enumerate(request.shapes):
            item = QueuedItem(request, index, tokens, sequences, (request.priority, deadline, start, number, index),
                              rows=request.rows[index] if request.rows else 0)
            bisect.insort(self._items, item, key=lambda queued: queued.order)
            self.tokens += tokens
            added.append(item)
        return added

    def put_back(self, items: Sequence[QueuedItem]) -> None:
        """Queue items again in their original order (those of a window a worker lost)."""
        for item in items:
            bisect.insort(self._items, item, key=lambda queued: queued.order)
            self.tokens += item.tokens

    def dispatched(self, items: Sequence[QueuedItem]) -> None:
        """Items leave for a worker: virtual time moves to their fair start."""
        self.virtual_now = max([self.virtual_now, *(item.order[2] for item in items)])
        self.remove(items)

    def remove(self, items: Sequence[QueuedItem]) -> None:
        gone = {id(item) for item in items}
        self._items = [item for item in self._items if id(item) not in gone]
        self.tokens -= sum(item.tokens for item in items)

    def of_request(self, key: int) -> list[QueuedItem]:
        return [item for item in self._items if item.request.key == key]

    def oldest_arrival(self) -> float:
        return min((item.request.arrival for item in self._items), default=math.inf)
