"""The model runner: packs items into windows and runs each as a graph replay or eagerly.

    runner = ModelRunner(model, WindowConfig(min_budget=256, max_budget=8192))
    runner.capture()                       # CUDA: capture every budget, measure the cost model
    result = runner.encode(pixel_values, grid_thw)
    result.embeddings(0), result.deepstack(0)   # views into one pinned host buffer

Every window's used output rows are copied once, non-blocking, into the output buffer (the
caller's, e.g. shared memory, or a pinned one made here); items are offsets into it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from vitserve.models import EncoderGeometry, VisionEncoder, check_patches, grid_list, pack_grids

from .capacities import Capacities, WindowConfig, resolve_capacities
from .cost_model import CostModel, time_ms
from .graphs import BudgetGraphs, CaptureReport
from .output_copy import OutputCopier
from .packing import ItemShape, Window, oversize_reason, pack
from .static_window import StaticWindow
from .stats import RunnerStats

log = logging.getLogger(__name__)

EAGER_CALIBRATION_TOKENS = (256, 1024, 4096, 16384)
CALIBRATION_SEGMENT = 256  # tokens per segment where attention is a small part of the time


@dataclass(frozen=True)
class ItemOutput:
    offset: int  # first row of the item in the output buffer
    rows: int  # output rows (EncoderGeometry.item_rows)


@dataclass
class EncodeResult:
    output: torch.Tensor  # (rows, 1 + deepstack, out_hidden): row r holds the embedding, then deepstack
    items: list[ItemOutput]  # in the caller's order
    done: torch.cuda.Event | None = None  # recorded after the last copy; None when already complete
    # per run of the forward: (budget, 0 when unpadded; "graph", or why it ran eagerly; patch tokens; padding tokens)
    runs: list[tuple[int, str, int, int]] = field(default_factory=list)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def embeddings(self, index: int) -> torch.Tensor:
        item = self.items[index]
        return self.output[item.offset:item.offset + item.rows, 0]  # (rows, out_hidden)

    def deepstack(self, index: int) -> torch.Tensor:
        item = self.items[index]
        return self.output[item.offset:item.offset + item.rows, 1:].transpose(0, 1)  # (deepstack, rows, out_hidden)


class ModelRunner:
    def __init__(self, model: VisionEncoder, config: WindowConfig | None = None):
        config = config or WindowConfig()
        weight = next(model.parameters())
        self.model = model
        self.device, self.dtype = weight.device, weight.dtype
        self.capacities: Capacities = resolve_capacities(config, model.geometry)
        self.use_graphs = config.graphs and self.device.type == "cuda"
        self.window = StaticWindow(model, self.capacities, self.device, self.dtype)
        self.copier = OutputCopier(self.window.output)
        self.graphs = BudgetGraphs(self.window, self.copier.nbytes) if self.use_graphs else None
        self.cost = CostModel()
        self.stats = RunnerStats()
        self.capture_report: CaptureReport | None = None

    # -- start-up ---------------------------------------------------------------------------
    def capture(self, progress: bool = True, cost: CostModel | None = None) -> CaptureReport | None:
        """Capture the budget graphs (CUDA with graphs on) and measure the cost model, unless `cost`
        (measured before on this device with this config, e.g. by the worker before a restart) is given."""
        if self.graphs is not None:
            self.capture_report = self.graphs.capture(self.padded_shapes(), progress=progress)
            log.info("captured %d graphs in %.1f s: %.0f MiB for graphs, %.0f MiB for buffers",
                     len(self.capture_report.keys), self.capture_report.seconds,
                     self.capture_report.graph_bytes / 2**20, self.capture_report.buffer_bytes / 2**20)
        if cost is not None:
            self.cost = cost
        else:
            self.calibrate()
        return self.capture_report

    def warm_up(self, cost: CostModel | None = None) -> Iterator[None]:
        """What `capture` does, a step per iteration, while the runner serves between the steps:
        each graph is captured (largest first) and used from then on; the cost model is `cost`,
        or, when none is given, eager timings first (so windows can be predicted at once) and the
        full measurement once every graph is there. Windows run eagerly until their graph is
        captured and measured."""
        began = time.perf_counter()
        if cost is not None:
            self.cost = cost
        elif self.graphs is not None:  # (without graphs nothing is served before the measurement)
            self.cost = CostModel(eager_base_points=self._eager_points(attention_ms_per_token2=0.0))
        yield
        if self.graphs is not None:
            reserved_before = torch.cuda.memory_reserved()
            for key in sorted(self.padded_shapes(), reverse=True):
                self.graphs.capture_one(key)
                yield
            self.capture_report = self.graphs.report(self.padded_shapes(), time.perf_counter() - began,
                                                     torch.cuda.memory_reserved() - reserved_before)
        if cost is None:
            measured = CostModel()
            for _ in self._calibration_steps(measured):
                yield
            self.cost = measured  # whole: a window never sees a model measured halfway

    def padded_shapes(self) -> list[tuple[int, int]]:
        """Every (budget, segment slots) a window can take; one graph each."""
        return [(b, s) for b in self.capacities.budgets for s in self.capacities.slot_tiers]

    def calibrate(self) -> CostModel:
        """Measure the cost model: attention per squared token, each padded shape, eager by tokens."""
        measured = CostModel()
        for _ in self._calibration_steps(measured):
            pass
        self.cost = measured
        return measured

    @torch.inference_mode()
    def _calibration_steps(self, cost: CostModel) -> Iterator[None]:
        """Fill `cost` in, yielding after each timing (a step of warm_up)."""
        short = CALIBRATION_SEGMENT
        largest = self.capacities.max_budget
        many = max(1, min(largest // short, self.capacities.max_sequences))
        top_slots = self.capacities.slot_tiers[-1]
        if self.device.type != "cuda":  # timed without warm-ups there: the first forward's set-up is no window's
            self._time_padded(largest, top_slots, many)
        one_long, _ = self._time_padded(largest, top_slots, 1)
        many_short, length = self._time_padded(largest, top_slots, many)
        squares = largest**2 - many * length**2
        cost.attention_ms_per_token2 = max(one_long - many_short, 0.0) / squares if squares > 0 else 0.0
        yield
        shapes = self.padded_shapes()
        if self.graphs is None:
            # Without graphs every slot tier of a budget runs the same kernels (the tier only sizes
            # the sequence metadata): time each budget once, at its widest tier, for all its tiers.
            shapes = [(budget, top_slots) for budget in self.capacities.budgets]
        for budget, slots in shapes:
            segments = max(1, min(slots - 1, budget // short))
            elapsed, length = self._time_padded(budget, slots, segments)
            padding = budget - segments * length
            square = segments * length**2 + padding**2
            base_ms = max(elapsed - cost.attention_ms_per_token2 * square, 0.0)
            tiers = self.capacities.slot_tiers if self.graphs is None else (slots,)
            cost.padded_base_ms.update({(budget, tier): base_ms for tier in tiers})
            yield
        cost.eager_base_points = self._eager_points(cost.attention_ms_per_token2)

    @torch.inference_mode()
    def _eager_points(self, attention_ms_per_token2: float) -> list[tuple[int, float]]:
        """(tokens, ms without attention) of unpadded eager runs of several sizes."""
        merge, short = self.model.geometry.merge_size, CALIBRATION_SEGMENT
        pool = self.model.geometry.temporal_pool  # frames per segment
        points = []
        largest_eager = 2 * self.capacities.max_budget
        wanted = {min(t, largest_eager) for t in EAGER_CALIBRATION_TOKENS} | {self.capacities.max_budget}
        # (segments, segment length) per size, as measured: sizes that round to the same run are timed once.
        step = merge * merge * pool  # a segment of `pool` frames, each a whole number of merge blocks
        runs = sorted({(max(1, t // min(short, t)), max(step, min(short, t) // step * step)) for t in wanted})
        for frames, segment in runs:  # `frames` segments of `pool` frames each
            grid = [(frames * pool, merge, segment // pool // merge)]
            pixels = torch.randn(frames * segment, self.model.geometry.patch_dim, device=self.device)
            elapsed = time_ms(lambda: self.model.encode_patches(pixels, grid), self.device)
            points.append((frames * segment, max(elapsed - attention_ms_per_token2 * frames * segment**2, 0.0)))
        return sorted(dict(points).items())

    def _time_padded(self, budget: int, slots: int, segments: int) -> tuple[float, int]:
        """Time of a padded window of `segments` equal segments, and their length."""
        length = self.window.stage_dummy(budget, segments)
        if self.graphs is not None and self.graphs.graphs:
            return time_ms(lambda: self.graphs.replay(budget, slots), self.device), length
        padding = budget - segments * length
        lengths = [length] * segments + ([padding] if padding else [])  # as encode passes them eagerly
        return time_ms(lambda: self.window.forward(budget, slots, lengths), self.device), length

    # -- encoding ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]],
               out: torch.Tensor | None = None, wait: bool = True) -> EncodeResult:
        """Encode packed patches of several items; `out` is (rows, 1 + deepstack, out_hidden) when given."""
        grids = grid_list(grid_thw)
        shapes = [ItemShape(self.model.item_tokens(*g), self.model.item_sequences(*g)) for g in grids]
        pixel_offsets = [0]
        for shape in shapes:
            pixel_offsets.append(pixel_offsets[-1] + shape.tokens)
        check_patches(pixel_values, pixel_offsets[-1], self.model.geometry, grids)
        pixel_values = pixel_values.to(self.device, non_blocking=True)  # one upload, then device copies
        item_rows = [self.model.geometry.item_rows(*g) for g in grids]  # (a Kimi chunk's frames share rows)
        total_rows = sum(item_rows)
        out = self._output_buffer(total_rows) if out is None else _check_output(out, total_rows, self.window.output)

        items: list[ItemOutput | None] = [None] * len(grids)
        runs: list[tuple[int, str, int, int]] = []
        cursor = 0
        for window in pack(shapes, self.capacities):
            sequences = window.sequences
            rows = sum(item_rows[i] for i in window.items)
            slots = self.capacities.fitting_slots(sequences)
            shape = None if window.budget is None or slots is None else (window.budget, slots)
            square = sum(shapes[i].tokens ** 2 // shapes[i].sequences for i in window.items)
            captured = shape is not None and (self.graphs is None or self.graphs.has(shape))  # (no graphs: eager over the buffers)
            if captured and (not self.use_graphs or self.cost.prefer_padded(shape, window.tokens, square,
                                                                              window.padding)):
                first_rows = self._run_static(window, shape, grids, pixel_values, pixel_offsets)
                self.copier.copy(self.window.output[:rows], out[cursor:cursor + rows])
                self.stats.record_padded(window, sequences, replayed=self.graphs is not None)
                runs.append((window.budget, "graph" if self.graphs is not None else "padded", window.tokens,
                             window.padding))
            else:
                first_rows = self._run_eager(window, grids, pixel_values, pixel_offsets, out[cursor:cursor + rows])
                reason = oversize_reason(shapes[window.items[0]], self.capacities)
                if not reason:
                    measured = captured and shape in self.cost.padded_base_ms
                    reason = "cheaper_than_graph" if measured else "not_measured" if captured else "not_captured"
                self.stats.record_eager(window, sequences, reason)
                runs.append((0, reason, window.tokens, 0))
            for index, first in zip(window.items, first_rows):
                items[index] = ItemOutput(cursor + first, item_rows[index])
            cursor += rows

        result = EncodeResult(out, items, done=self.copier.barrier(), runs=runs)
        if wait:
            result.wait()
        return result

    def _run_static(self, window: Window, shape: tuple[int, int], grids, pixel_values, pixel_offsets) -> list[int]:
        first_rows = self.window.stage(window, grids, pixel_values, pixel_offsets)
        if self.graphs is not None:
            self.graphs.replay(*shape)
        else:
            # Eager over the same buffers; host-known segment lengths spare SDPA a dense mask.
            self.window.forward(*shape, self.window.host_segment_lengths(window, grids, shape[1]))
        return first_rows

    def _run_eager(self, window: Window, grids, pixel_values, pixel_offsets, destination: torch.Tensor) -> list[int]:
        """Unpadded forward of the window's items (too large for any budget, or cheaper than its graph)."""
        window_grids = [grids[i] for i in window.items]
        pixels = torch.cat([pixel_values[pixel_offsets[i]:pixel_offsets[i + 1]] for i in window.items])  # (tokens, patch_dim)
        packed = pack_grids(self.model, window_grids)
        layout = packed.layout.pin_memory() if self.device.type == "cuda" else packed.layout
        meta = self.model.metadata(layout.to(self.device, non_blocking=True), packed.num_tokens,
                                   packed.num_sequences, packed.max_seqlen, packed.segment_lengths)
        encoded = self.model(pixels.to(self.dtype), meta)
        # One contiguous block, as the static window lays it out, then one copy.
        block = torch.cat([encoded.embeddings[:, None], encoded.deepstack.transpose(0, 1)], dim=1)
        # (the forward's tokens / 4 rows: fewer are real when a tower pools frames, as Kimi K2.5 does)
        self.copier.copy(block[:destination.shape[0]], destination)  # (rows, 1 + deepstack, out_hidden)
        return first_rows(self.model.geometry, window_grids)

    def _output_buffer(self, rows: int) -> torch.Tensor:
        shape = (rows, *self.window.output.shape[1:])
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")


def first_rows(geometry: EncoderGeometry, grids: Sequence[tuple[int, int, int]]) -> list[int]:
    """Where each item's rows start in a window's output: the items' rows back to back."""
    starts, row = [], 0
    for grid in grids:
        starts.append(row)
        row += geometry.item_rows(*grid)
    return starts


def _check_output(out: torch.Tensor, rows: int, static_output: torch.Tensor) -> torch.Tensor:
    expected = (rows, *static_output.shape[1:])
    if static_output.is_cuda and out.device.type == "cpu" and not out.is_pinned():
        raise ValueError(
            "output buffer is in pageable host memory, which would serialise every window's copy: pin it "
            "(torch.empty(..., pin_memory=True), or register a shared-memory slab with cudaHostRegister)"
        )
    if tuple(out.shape) != expected or out.dtype != static_output.dtype or not out.is_contiguous():
        layout = "" if out.is_contiguous() else ", not contiguous"
        raise ValueError(
            f"output buffer must be a contiguous {static_output.dtype} tensor of shape {expected}, "
            f"got {out.dtype} {tuple(out.shape)}{layout}"
        )
    return out
