"""CUDA graphs of the static window, one per budget, in one memory pool.

Graphs are captured one at a time (`capture_one`), so a worker can serve eagerly between
captures; `capture` takes them all at once. Either way the largest goes first, so smaller graphs
reuse its blocks of the shared pool.
"""

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
        self._pool = None  # the graphs' shared memory pool, made with the first graph
        self._side: torch.cuda.Stream | None = None

    def has(self, key: tuple[int, int]) -> bool:
        return key in self.graphs

    @torch.inference_mode()
    def capture_one(self, key: tuple[int, int]) -> None:
        """Warm the shape up eagerly on a side stream, then capture its graph. The device work queued
        before (windows in flight) is ordered before it and goes on meanwhile; torch.cuda.graph waits
        for it before the capture itself."""
        budget, slots = key
        if self._pool is None:
            self._pool, self._side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)  # the static buffers are the windows' too
        with torch.cuda.stream(self._side):
            for _ in range(WARMUP_RUNS):
                self.window.stage_dummy(budget)
                self.window.forward(budget, slots)
        current.wait_stream(self._side)
        self.window.stage_dummy(budget)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # synchronises, collects garbage, empties the cache
            self.window.forward(budget, slots)
        self.graphs[key] = graph

    def capture(self, keys: list[tuple[int, int]], progress: bool = True) -> CaptureReport:
        """Capture a graph per (budget, slots) not captured yet, largest first."""
        keys = sorted(keys, reverse=True)
        started = time.perf_counter()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved()
        # No tqdm at all without progress: even a disabled bar creates a multiprocessing lock, which
        # a killed worker leaves registered with the engine's resource tracker (a warning at exit).
        shown = tqdm(keys, desc="capturing CUDA graphs", unit="graph") if progress else keys
        for key in shown:
            if key not in self.graphs:
                self.capture_one(key)
        torch.cuda.synchronize()
        return self.report(keys, time.perf_counter() - started, torch.cuda.memory_reserved() - reserved_before)

    def report(self, keys, seconds: float, graph_bytes: int) -> CaptureReport:
        return CaptureReport(keys=tuple(sorted(keys, reverse=True)), seconds=seconds, graph_bytes=graph_bytes,
                             buffer_bytes=self.window.nbytes + self.extra_buffer_bytes)

    def replay(self, budget: int, slots: int) -> None:
        self.graphs[budget, slots].replay()
