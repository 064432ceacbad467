"""One worker's state: its model and runner (graphs captured, cost model measured or reused), its
output slabs and input slabs, and the windows it starts. The process around it is process.py.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitserve.ipc.messages import MakeSlabs, RunWindow, SlabsMade, WorkerCost, WorkerReady
from vitserve.ipc.sealed import SealError, create_sealed
from vitserve.preprocess import PreprocessConfig, preprocess_batch

from .capacities import WindowConfig
from .cost_cache import cost_cache_path, read_cost, write_cost
from .cost_model import CostModel
from .runner import EncodeResult, ModelRunner
from .running import DeviceFault, Running, is_cuda_error
from .worker_inputs import TORCH_DTYPES, WorkerInputs, pin_for_cuda

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable for the spawn start method."""

    worker: int
    endpoint: str  # the engine's PAIR socket
    model: str
    device: str
    dtype: str | None
    window: WindowConfig
    preprocess: PreprocessConfig
    threads: int | None = None  # torch CPU threads (CPU workers share the host)
    log_level: int = logging.WARNING
    heartbeat_s: float = 1.0  # how often the worker's beat thread beats
    # The cost model this worker measured before a restart (same device, same config): reused, so a
    # restarted worker is back without measuring it again. None: measure it.
    cost: WorkerCost | None = None
    progress: bool = False  # say each start-up phase on stderr (`vitserve serve` does)
    cache_dir: str | None = None  # where measured cost models are kept between starts; None: nowhere
    spawned_at: float = 0.0  # time.monotonic() when the engine spawned it (0: unknown)
    # Where the beats go: the engine's shared double (a multiprocessing RawValue, picklable only
    # while the process is spawned); None: no heartbeat (a worker run by hand, as tools/ do).
    beat_at: Any = field(default=None, compare=False, repr=False)


class Worker:
    def __init__(self, spec: WorkerSpec, engine_pid: int):
        from vitserve.models import load_model

        self.spec = spec
        self.engine_pid = engine_pid  # holds the input slabs' descriptors, which the worker opens through /proc
        self.device = torch.device(spec.device)
        began = time.perf_counter()
        say = _progress(spec)
        say(f"loading {spec.model}")
        model = load_model(spec.model, device=self.device, dtype=TORCH_DTYPES.get(spec.dtype) if spec.dtype else None)
        self.runner = ModelRunner(model, spec.window)
        kept = None if spec.cache_dir is None else cost_cache_path(Path(spec.cache_dir), self.runner)
        known = CostModel.from_message(spec.cost) if spec.cost is not None else read_cost(kept, self.runner)
        graphs = len(self.runner.padded_shapes()) if self.runner.use_graphs else 0
        say(f"loaded; {f'capturing {graphs} graphs, then ' if graphs else ''}"
            f"{'reusing the cost model measured before' if known else 'measuring the cost model'}")
        loaded = time.perf_counter()
        report = self.runner.capture(progress=False, cost=known)
        if known is None:
            write_cost(kept, self.runner.cost)
        capture_s = time.perf_counter() - began
        graphs_s = report.seconds if report is not None else 0.0
        say(f"ready: load {loaded - began:.1f} s, graphs {graphs_s:.1f} s, cost model "
            f"{time.perf_counter() - loaded - graphs_s:.1f} s")
        self.slabs: dict[str, mmap.mmap] = {}  # made when the engine asks, after the handshake
        self._slab_descriptors: list[int] = []  # kept open: the engine opens its own copies through /proc
        self.inputs = WorkerInputs(self.device, engine_pid)  # the engine's input slabs, as this worker maps them
        self.started = 0  # windows started so far (each one's sequence)
        self._last_end: torch.cuda.Event | None = None  # timing event after the last window's copies
        geometry = model.geometry
        self.row_shape = (1 + geometry.num_deepstack, geometry.out_hidden_size)
        caps, cost = self.runner.capacities, self.runner.cost
        self.ready = WorkerReady(
            worker=spec.worker, device=str(self.device), budgets=caps.budgets, max_items=caps.max_items,
            max_sequences=caps.max_sequences, merge_factor=caps.merge_factor,
            out_hidden=geometry.out_hidden_size, num_deepstack=geometry.num_deepstack,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            cost=WorkerCost(*cost.to_lists()),
            capture_s=capture_s,
        )

    def start(self, message: RunWindow) -> Running:
        """Queue the window's work on the device without waiting for it."""
        received = time.perf_counter()
        self.started += 1
        try:
            began = self._timing_event(torch.cuda.current_stream(self.device)) if self.device.type == "cuda" else None
            result = self._encode(message)
            running = Running(message.window, result, received=received, sequence=self.started)
            if began is not None:
                running.began, running.previous = began, self._last_end
                running.ended = self._last_end = self._timing_event(self.runner.copier.copy_stream)
            return running
        except Exception as err:  # the window fails, the worker goes on (unless the device is broken)
            if self.device.type == "cuda" and is_cuda_error(err):
                raise DeviceFault(f"window {message.window}: {type(err).__name__}: {err}") from err
            log.exception("window %d failed", message.window)
            return Running(message.window, None, f"{type(err).__name__}: {err}", received, self.started)

    @staticmethod
    def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    @torch.inference_mode()
    def _encode(self, message: RunWindow) -> EncodeResult:
        grids = [item.grid for item in message.items]
        pieces = self.inputs.on_device(message.items)  # each item's array on the device, in the window's order
        raw = [i for i, item in enumerate(message.items) if item.kind != "patches"]
        if raw:
            patches = preprocess_batch([pieces[i] for i in raw], self.spec.preprocess, device=self.device)
            done = [tuple(g) for g in patches.grid_thw.tolist()]
            if done != [grids[i] for i in raw]:
                raise RuntimeError(f"preprocessing gave grids {done}, the engine planned {[grids[i] for i in raw]}")
            for i, part in zip(raw, patches.pixel_values.split([t * h * w for t, h, w in done])):
                pieces[i] = part
        pixel_values = torch.cat(pieces)  # (tokens, patch_dim) in the window's order
        rows = pixel_values.shape[0] // self.runner.capacities.merge_factor
        out = self._slot(message, rows)
        return self.runner.encode(pixel_values, grids, out=out, wait=False)

    def _slot(self, message: RunWindow, rows: int) -> torch.Tensor:
        """The leased run as the runner's output tensor (rows, 1 + deepstack, out_hidden), with the
        rest of the run cleared: no reader of this window can see an earlier window's rows there."""
        mapping = self.slabs.get(message.slab)
        if mapping is None:
            raise RuntimeError(f"slab {message.slab} is not one of this worker's ({sorted(self.slabs)})")
        count = rows * self.row_shape[0] * self.row_shape[1]
        used = count * self.runner.dtype.itemsize
        if not (0 <= message.offset and used <= message.run_bytes and message.offset + message.run_bytes <= len(mapping)):
            raise RuntimeError(f"{rows} rows ({used} bytes) at {message.offset} do not fit the run of "
                               f"{message.run_bytes} bytes in slab {message.slab} of {len(mapping)}")
        if message.run_bytes > used:  # the host clears it while the device computes the rows (a disjoint range)
            torch.frombuffer(mapping, dtype=torch.uint8, count=message.run_bytes - used,
                             offset=message.offset + used).zero_()
        flat = torch.frombuffer(mapping, dtype=self.runner.dtype, count=count, offset=message.offset)
        return flat.view(rows, *self.row_shape)

    def make_slabs(self, message: MakeSlabs) -> SlabsMade:
        """Make and seal the output slabs: mapped writable here (and page-locked for the device's
        copies) before the seals, so this process alone can write them."""
        pin = pin_for_cuda if self.device.type == "cuda" else None
        made: list[tuple[str, int, mmap.mmap]] = []
        try:
            for name, size in message.slabs:
                fd, mapping = create_sealed(name, size, prepare=pin)
                made.append((name, fd, mapping))
        except (SealError, RuntimeError) as err:
            for _, fd, _ in made:
                os.close(fd)
            log.error("making the output slabs failed: %s", err)
            return SlabsMade([], str(err))
        for name, fd, mapping in made:
            self.slabs[name] = mapping
            self._slab_descriptors.append(fd)
        return SlabsMade([fd for _, fd, _ in made])

    def close(self) -> None:
        self.inputs.close()
        self.slabs.clear()
        for fd in self._slab_descriptors:
            os.close(fd)
        self._slab_descriptors.clear()


def _progress(spec: WorkerSpec):
    """A function that says a start-up phase on stderr (when the spec asks for it), with the time since
    the engine spawned the process (CLOCK_MONOTONIC is one clock for the whole host)."""
    began = spec.spawned_at or time.monotonic()

    def say(message: str) -> None:
        if spec.progress:
            print(f"vitserve: worker {spec.worker} ({spec.device}), {time.monotonic() - began:5.1f} s: {message}",
                  file=sys.stderr, flush=True)
    return say
