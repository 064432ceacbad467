"""Forming a window from the head of the queue: the items that fit the largest budget together.

Items are taken in queue order while they fit the budget, item and sequence capacities; after the
first that does not, up to `lookahead` more are looked at for one that does (a small item can fill
the gap a large one left). An item larger than any window runs alone, eagerly, as the runner
packs it: it is a window of its own when it is at the head, and skipped otherwise.
"""

from __future__ import annotations

from typing import Iterable

from vitserve.workers import Capacities

from .queue import QueuedItem
from .state import Candidate


def form_window(queue: Iterable[QueuedItem], capacities: Capacities, lookahead: int) -> Candidate:
    """Items from the head of the queue that fit one window together."""
    caps, window = capacities, Candidate()
    scanned_past: int | None = None  # items looked at after the first that did not fit
    for item in queue:
        if scanned_past is not None:
            scanned_past += 1
            if scanned_past > lookahead:
                break
        if item.tokens > caps.max_budget or item.sequences > caps.max_sequences:
            if not window.items:  # no window holds it: it runs eagerly, alone
                _add(window, item, caps)
                window.full = True
                return window
            continue  # it will go alone; it does not make this window full
        if (window.tokens + item.tokens <= caps.max_budget and len(window.items) < caps.max_items
                and window.sequences + item.sequences <= caps.max_sequences):
            _add(window, item, caps)
        else:
            window.full = True
            scanned_past = 0 if scanned_past is None else scanned_past
    window.full = window.full or (window.tokens == caps.max_budget or len(window.items) == caps.max_items
                                  or window.sequences == caps.max_sequences)
    return window


def _add(window: Candidate, item: QueuedItem, capacities: Capacities) -> None:
    window.items.append(item)
    window.tokens += item.tokens
    window.sequences += item.sequences
    window.square_tokens += item.square_tokens
    window.rows += item.rows or item.tokens // capacities.merge_factor  # (0: not given, tokens / merge)
