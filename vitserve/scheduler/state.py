"""What the scheduler knows of each worker, the window it is forming, and what its decisions produce."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .queue import QueuedItem, Request

# (patch tokens, attention sequences, sum of squared segment lengths) -> predicted milliseconds
Predictor = Callable[[int, int, int], float]


@dataclass(eq=False)
class WorkerState:
    id: int
    predict: Predictor
    ready: bool = True
    free_rows: int = 1 << 62  # output rows it can still lease in shared memory; a window needs tokens / merge²
    row_granularity: int = 1  # rows are leased in slots of this many: a window needs whole slots
    busy_until: float = 0.0  # predicted end of its in-flight windows, scheduler clock seconds
    in_flight: dict[int, float] = field(default_factory=dict)  # window id -> predicted ms
    scale: float = 1.0  # observed / modelled processing time, learned from completions
    overhead_ms: float = 0.0  # learned latency of a window sent to an idle worker, beyond its processing
    last_done: float = -math.inf  # when its latest window completed
    # its readiness probe failed or is overdue (engine/probes.py): it gets windows only while every
    # worker up is suspect
    suspect: bool = False

    def predicted_ms(self, tokens: int, sequences: int, square_tokens: int) -> float:
        return self.predict(tokens, sequences, square_tokens) * self.scale


@dataclass(frozen=True)
class Dispatch:
    window: int
    worker: int
    items: list[QueuedItem]
    tokens: int
    predicted_ms: float
    modelled_ms: float  # the cost model's figure, before the worker's learned scale


@dataclass(frozen=True)
class Failure:
    request: Request
    code: str  # an ErrorCode of the wire protocol
    message: str
    retry_after_ms: float | None = None


@dataclass
class Candidate:
    """A window being formed from the head of the queue, before it leaves."""

    items: list[QueuedItem] = field(default_factory=list)
    tokens: int = 0
    sequences: int = 0
    square_tokens: int = 0
    rows: int = 0  # output rows its items write
    full: bool = False

    def earliest_deadline(self) -> float:
        return min(item.request.deadline for item in self.items)
