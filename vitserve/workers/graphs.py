"""CUDA graphs of the static window, one per budget, in one memory pool."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .static_window import StaticWindow

WARMUP_RUNS = 2  # eager runs on a side stream before capture: kernel selection, allocator, cuDNN plans


@dataclass(frozen=True)
class CaptureReport:
    keys: tuple[tuple[int, int], ...]  # (budget, segment slots) of every graph
    seconds: float
    graph_bytes: int  # device memory the graphs' pool took
    buffer_bytes: int  # the static buffers


class BudgetGraphs:
    def __init__(self, window: StaticWindow, extra_buffer_bytes: int = 0):
        self.extra_buffer_bytes = extra_buffer_bytes  # other static buffers, for the report
        self.window = window
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (budget, slots) -> graph

    @torch.inference_mode()
    def capture(self, keys: list[tuple[int, int]], progress: bool = True) -> CaptureReport:
        """Capture a graph per (budget, slots), largest first, so smaller graphs reuse the largest's blocks."""
        keys = sorted(keys, reverse=True)
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                for budget, slots in keys:
                    self.window.stage_dummy(budget)
                    self.window.forward(budget, slots)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's activations are not the graphs' memory
        reserved_before = torch.cuda.memory_reserved()
        # No tqdm at all without progress: even a disabled bar creates a multiprocessing lock, which
        # a killed worker leaves registered with the engine's resource tracker (a warning at exit).
        shown = tqdm(keys, desc="capturing CUDA graphs", unit="graph") if progress else keys
        for budget, slots in shown:
            self.window.stage_dummy(budget)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.window.forward(budget, slots)
            self.graphs[budget, slots] = graph
        torch.cuda.synchronize()
        return CaptureReport(
            keys=tuple(keys),
            seconds=time.perf_counter() - started,
            graph_bytes=torch.cuda.memory_reserved() - reserved_before,
            buffer_bytes=self.window.nbytes + self.extra_buffer_bytes,
        )

    def replay(self, budget: int, slots: int) -> None:
        self.graphs[budget, slots].replay()
