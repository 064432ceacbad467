"""How the workers' outputs are laid out in shared memory, from their readiness reports.

A row is one output token: the embedding then each deepstack feature. A slot holds
`slot_rows` rows, so that a window of the largest budget spans SLOTS_PER_WINDOW slots; a
window leases a run of as many slots as its rows need. Each worker's slab holds
`output_windows` largest windows, and at least one largest eager item.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from vitserve.ipc.worker_messages import WorkerCost, WorkerReady
from vitserve.ipc.slabs import numpy_dtype
from vitserve.scheduler import Predictor
from vitserve.workers import Capacities, CostModel
from vitserve.workers.cost_model import window_ms
from vitserve.workers.packing import ItemShape, pack

from .config import EngineConfig
from .errors import EngineError

SLOTS_PER_WINDOW = 64


@dataclass(frozen=True)
class OutputLayout:
    row_shape: tuple[int, int]  # (1 + deepstack, out_hidden)
    row_bytes: int
    slot_rows: int
    slots: int  # per worker

    def slots_for(self, rows: int) -> int:
        return -(-rows // self.slot_rows)


def agreed_capacities(readies: Sequence[WorkerReady]) -> Capacities:
    """The capacities every worker reported; they must agree (same model and window config), and
    so must the model they serve: its outputs and weights."""
    first = readies[0]
    shape = (first.budgets, first.max_items, first.max_sequences, first.merge_factor)
    model = _served(first)
    for ready in readies[1:]:
        if (ready.budgets, ready.max_items, ready.max_sequences, ready.merge_factor) != shape:
            raise RuntimeError(f"workers disagree on capacities: {first} vs {ready}")
        if _served(ready) != model:
            raise RuntimeError(f"workers {first.worker} and {ready.worker} serve different models (model type, "
                               f"weights' fingerprint, outputs): {model} vs {_served(ready)}; did the checkpoint "
                               "change on disk while the engine ran?")
    return Capacities(*shape)


def _served(ready: WorkerReady) -> tuple:
    return ready.model_type, ready.fingerprint, ready.dtype, ready.out_hidden, ready.num_deepstack


def row_bytes(ready: WorkerReady) -> int:
    """Bytes of one output row: the embedding and its deepstack rows."""
    return (1 + ready.num_deepstack) * ready.out_hidden * numpy_dtype(ready.dtype).itemsize


def item_token_limit(config: EngineConfig, ready: WorkerReady, capacities: Capacities) -> int:
    """The engine's largest item in patch tokens: max_item_tokens when given; else the preprocessing's
    largest item (at least twice the largest budget), within max_item_output_bytes of outputs."""
    if config.max_item_tokens is not None:
        return config.max_item_tokens
    within_memory = config.max_item_output_bytes // row_bytes(ready) * capacities.merge_factor
    return max(2 * capacities.max_budget, min(config.item_token_limit, within_memory))


def output_layout(ready: WorkerReady, capacities: Capacities, output_windows: int, item_token_limit: int) -> OutputLayout:
    row_shape = (1 + ready.num_deepstack, ready.out_hidden)
    window_rows = capacities.max_budget // capacities.merge_factor
    largest_rows = max(window_rows, item_token_limit // capacities.merge_factor)
    slot_rows = max(1, window_rows // SLOTS_PER_WINDOW)
    slots = max(output_windows * -(-window_rows // slot_rows), -(-largest_rows // slot_rows))
    return OutputLayout(row_shape, row_bytes(ready), slot_rows, slots)


def predictor(cost: WorkerCost, capacities: Capacities) -> Predictor:
    """A worker's measured cost model as the scheduler's (tokens, sequences, squares) -> ms."""
    return functools.partial(window_ms, CostModel.from_message(cost), capacities)


def request_slots(shapes: Sequence[tuple[int, int]], rows: Sequence[int], capacities: Capacities,
                  layout: OutputLayout) -> int:
    """Output slots a request's items, (tokens, segments) and output rows each, lease when they are
    packed by themselves (first fit decreasing, as the runner packs): what it needs of one worker's
    memory with nothing else held."""
    windows = pack([ItemShape(tokens, sequences) for tokens, sequences in shapes], capacities)
    return sum(layout.slots_for(sum(rows[i] for i in window.items)) for window in windows)


def check_request_fits(shapes: Sequence[tuple[int, int]], rows: Sequence[int], capacities: Capacities,
                       layout: OutputLayout, output_windows: int) -> None:
    """A request whose outputs cannot fit a worker's shared memory even with nothing else held
    would be computed and then fail, every time: EngineError `too_large` now, naming the limit."""
    if sum(layout.slots_for(r) for r in rows) <= layout.slots:
        return  # each item in slots of its own fits: packed together they take no more (per request, skips the packing)
    slots = request_slots(shapes, rows, capacities, layout)
    if slots > layout.slots:
        row_mib = layout.slot_rows * layout.row_bytes / 2**20
        raise EngineError("too_large", f"the request's outputs need {slots * row_mib:.0f} MiB of shared memory "
                                       f"({slots} slots of {layout.slot_rows} rows), more than a worker's "
                                       f"{layout.slots * row_mib:.0f} MiB (output_windows={output_windows}): "
                                       f"split it, or raise output_windows")
