"""Packing items into windows against all three capacities.

First-fit decreasing by tokens: items go, largest first, into the first open window with room
for their tokens, their sequences and one more item; each window then takes the smallest
budget that holds it. An item that no budget (or no sequence capacity) can hold gets a window
of its own that runs eagerly. Windows list item indices, so results map back to the caller's
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .capacities import Capacities


@dataclass(frozen=True)
class ItemShape:
    tokens: int  # patch tokens
    sequences: int  # attention segments


@dataclass
class Window:
    items: list[int] = field(default_factory=list)  # indices into the caller's item list
    tokens: int = 0
    sequences: int = 0
    budget: int | None = None  # None: runs eagerly, unpadded

    @property
    def padding(self) -> int:
        return 0 if self.budget is None else self.budget - self.tokens


def oversize_reason(item: ItemShape, capacities: Capacities) -> str | None:
    """Why `item` cannot go in any graph window, or None when it can."""
    if item.tokens > capacities.max_budget:
        return "too_many_tokens"
    if item.sequences > capacities.max_sequences:
        return "too_many_sequences"
    return None


def pack(items: Sequence[ItemShape], capacities: Capacities) -> list[Window]:
    """Windows covering every item exactly once, none over any capacity."""
    windows: list[Window] = []
    eager: list[Window] = []
    order = sorted(range(len(items)), key=lambda i: (-items[i].tokens, i))
    for index in order:
        item = items[index]
        if oversize_reason(item, capacities) is not None:
            eager.append(Window([index], item.tokens, item.sequences, budget=None))
            continue
        window = next((w for w in windows if _fits(w, item, capacities)), None)
        if window is None:
            window = Window()
            windows.append(window)
        window.items.append(index)
        window.tokens += item.tokens
        window.sequences += item.sequences
    for window in windows:
        window.budget = capacities.fitting_budget(window.tokens)
    return windows + eager


def _fits(window: Window, item: ItemShape, capacities: Capacities) -> bool:
    return (
        window.tokens + item.tokens <= capacities.max_budget
        and window.sequences + item.sequences <= capacities.max_sequences
        and len(window.items) < capacities.max_items
    )
