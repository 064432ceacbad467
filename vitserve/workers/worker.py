"""One worker's state: its model and runner (graphs captured, cost model measured or reused), its
output slabs and input slabs, and the windows it starts. The process around it is process.py.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Iterator

import msgspec
import torch

from vitserve.log_lines import event

from vitserve.ipc.worker_messages import (
    Begin, MakeSlabs, MapInputs, RunWindow, SlabsMade, WorkerCost, WorkerReady, WorkerWarm,
)
from vitserve.ipc.sealed import SealError, create_sealed
from vitserve.launch import WorkerSpec
from vitserve.models import VisionEncoder
from vitserve.preprocess import PreprocessConfig, preprocess_batch

from .capacities import WindowConfig
from .cost_cache import cost_cache_path, read_cost, write_cost
from .cost_model import CostModel
from .runner import EncodeResult, ModelRunner
from .running import DeviceFault, Probing, Running, is_cuda_error
from .worker_inputs import TORCH_DTYPES, WorkerInputs, pin_for_cuda

log = logging.getLogger(__name__)


def load_for_worker(spec: WorkerSpec) -> VisionEncoder:
    """The worker's model on its device, with one small forward run: the device's kernels and
    libraries are set up before the first window, not while it waits."""
    from vitserve.models import load_model

    device = torch.device(spec.device)
    model = load_model(spec.model, device=device, dtype=TORCH_DTYPES.get(spec.dtype) if spec.dtype else None)
    merge = model.geometry.merge_size
    with torch.inference_mode():
        model.encode_patches(torch.zeros(merge * merge, model.geometry.patch_dim, device=device), [(1, merge, merge)])
    return model


def check_fits(preprocess: PreprocessConfig, model: VisionEncoder) -> None:
    """The preprocessing must cut the patches the tower takes (a processor config that disagrees
    with the checkpoint's config.json would give every window the wrong shape)."""
    geometry = model.geometry
    wrong = [f"{name} {mine} (the model's: {theirs})" for name, mine, theirs in (
        ("patch_size", preprocess.patch_size, geometry.patch_size),
        ("temporal_patch_size", preprocess.temporal_patch_size, geometry.temporal_patch_size),
        ("merge_size", preprocess.merge_size, geometry.merge_size)) if mine != theirs]
    if wrong:
        raise ValueError(f"the preprocessing does not fit the model: {', '.join(wrong)}; make the processor "
                         "configs agree with config.json's vision_config")


class Worker:
    def __init__(self, spec: WorkerSpec, engine_pid: int, begin: Begin, model: VisionEncoder):
        """Get ready to serve `model` (load_for_worker's) with `begin`'s settings. `begin.cost`: the
        cost model this worker measured before a restart (same device, same config), reused."""
        self.spec = spec
        self.device = torch.device(spec.device)
        self.began = time.perf_counter()
        if self.device.type != "cpu":
            # The host's share of a window is a few small operations: one thread. (torch's default, a
            # thread per core, splits the larger ones, and the threads then spin a while on every core,
            # taking them from the engine's loop and local clients.) The model is loaded by then.
            torch.set_num_threads(1)
        self.say = start_progress(spec, max(spec.spawned_at, begin.sent_at))
        self.busy_poll_s = begin.busy_poll_ms / 1e3  # when the loop polls instead of sleeping (running.Pauses)
        self.preprocess = msgspec.convert(begin.preprocess, PreprocessConfig)
        check_fits(self.preprocess, model)
        self.runner = ModelRunner(model, msgspec.convert(begin.window, WindowConfig))
        self._cost_path = None if begin.cache_dir is None else cost_cache_path(Path(begin.cache_dir), self.runner)
        known = CostModel.from_message(begin.cost) if begin.cost is not None else read_cost(self._cost_path, self.runner)
        self._measuring = known is None
        graphs = len(self.runner.padded_shapes()) if self.runner.use_graphs else 0
        # Serve while the graphs are captured (and the cost model measured): eagerly at first, each
        # window on its graph once that is there. Without graphs there is nothing worth serving
        # for meanwhile: the cost model is measured (or reused) first.
        self._warming: Iterator[None] | None = self.runner.warm_up(known)
        next(self._warming)  # the cost model the engine plans with until the warm-up ends
        if graphs:
            self.say(f"serving eagerly while {graphs} graphs are captured"
                     f"{'' if known else ' and the cost model is measured'}")
        else:
            for _ in self._warming:
                pass
            self._warmed()
        self.slabs: dict[str, mmap.mmap] = {}  # made when the engine asks, after the handshake
        self._slab_descriptors: list[int] = []  # kept open: the engine opens its own copies through /proc
        # The engine's input slabs, as this worker maps them (the engine holds their descriptors, which the
        # worker opens through /proc/<engine_pid>).
        self.inputs = WorkerInputs(self.device, engine_pid)
        self.started = 0  # windows started so far (each one's sequence)
        self._last_end: torch.cuda.Event | None = None  # timing event after the last window's copies
        geometry = model.geometry
        self.row_shape = (1 + geometry.num_deepstack, geometry.out_hidden_size)
        merge = geometry.merge_size  # the readiness probe's input, made once
        self._probe_grid = (1, merge, merge)
        self._probe_patches = torch.zeros(merge * merge, geometry.patch_dim, device=self.device)
        caps = self.runner.capacities
        self.ready = WorkerReady(
            worker=spec.worker, device=str(self.device), budgets=caps.budgets, max_items=caps.max_items,
            max_sequences=caps.max_sequences, merge_factor=caps.merge_factor,
            out_hidden=geometry.out_hidden_size, num_deepstack=geometry.num_deepstack,
            dtype=str(self.runner.dtype).removeprefix("torch."), model_type=model.model_type,
            fingerprint=model.weights_fingerprint, cost=self.cost_message(), ready_s=time.perf_counter() - self.began, warming=self.warming,
            temporal_pool=geometry.temporal_pool,
        )

    @property
    def warming(self) -> bool:
        """Graphs still to capture or the cost model still to measure (`warm_step` does the next part)."""
        return self._warming is not None

    def warm_step(self) -> WorkerWarm | None:
        """One step of the warm-up (a graph captured, or one timing); the report for the engine
        once the last one is done."""
        if self._warming is None:
            return None
        try:
            if next(self._warming, StopIteration) is not StopIteration:
                return None
        except Exception as err:  # e.g. out of memory for a graph: serve on with what there is
            if self.device.type == "cuda" and is_cuda_error(err):
                raise DeviceFault(f"warming up: {type(err).__name__}: {err}") from err
            log.exception("warming up failed; windows without a graph run eagerly")
            return self._warmed(f"{type(err).__name__}: {err}")
        return self._warmed()

    def _warmed(self, problem: str = "") -> WorkerWarm:
        self._warming = None
        if self._measuring and not problem:
            write_cost(self._cost_path, self.runner.cost)
        seconds = time.perf_counter() - self.began
        cost = f"cost model {'measured' if self._measuring else 'reused'}"
        if self.runner.graphs is None:  # (no warm-up to speak of: said before the first window)
            self.say(f"{cost} ({seconds:.1f} s)")
        else:
            self.say(f"warm: {len(self.runner.graphs.graphs)} graphs, {cost}; {seconds:.1f} s after Begin"
                     f"{f'; stopped early: {problem}' if problem else ''}")
        return WorkerWarm(self.spec.worker, self.cost_message(), seconds, problem)

    def cost_message(self) -> WorkerCost:
        return WorkerCost(*self.runner.cost.to_lists())

    def start(self, message: RunWindow) -> Running:
        """Queue the window's work on the device without waiting for it."""
        received = time.perf_counter()
        self.started += 1
        cuda = self.device.type == "cuda"
        try:
            mark = (lambda: self._timing_event(torch.cuda.current_stream(self.device))) if cuda else time.perf_counter
            began, copied = mark(), self.runner.copier.host_copy_s
            pixel_values, grids = self._inputs(message)
            prepared = mark()
            result = self._encode(message, pixel_values, grids)
            running = Running(message.window, result, received=received, sequence=self.started)
            if cuda:  # (the events are queued before the host clears the run's rest: they time the device alone)
                running.began, running.prepared, running.computed = began, prepared, mark()
                running.previous = self._last_end
                running.ended = self._last_end = self._timing_event(self.runner.copier.copy_stream)
            else:
                running.host_stages_ms = ((prepared - began) * 1e3, (self.runner.copier.host_copy_s - copied) * 1e3)
            self._clear_rest(message, result.output.numel() * result.output.element_size())  # while the device works
            return running
        except Exception as err:  # the window fails, the worker goes on (unless the device is broken)
            if cuda and is_cuda_error(err):
                raise DeviceFault(f"window {message.window}: {type(err).__name__}: {err}") from err
            log.exception("window %d failed", message.window)
            return Running(message.window, None, f"{type(err).__name__}: {err}", received, self.started)

    def probe(self, probe: int) -> Probing:
        """Queue the readiness probe's forward (one merge block of zeros, as at load) on the device."""
        received = time.perf_counter()
        sequence = self.started + 1
        try:
            with torch.inference_mode():
                self.runner.model.encode_patches(self._probe_patches, [self._probe_grid])
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
            return Probing(probe, done, received, sequence)
        except Exception as err:
            if self.device.type == "cuda" and is_cuda_error(err):
                raise DeviceFault(f"readiness probe: {type(err).__name__}: {err}") from err
            log.exception("readiness probe %d failed", probe)
            return Probing(probe, None, received, sequence, f"{type(err).__name__}: {err}")

    @staticmethod
    def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    @torch.inference_mode()
    def _inputs(self, message: RunWindow) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """The window's patches on the device, raw items preprocessed there, and their grids."""
        grids = [item.grid for item in message.items]
        pieces = self.inputs.on_device(message.items)  # each item's array on the device, in the window's order
        raw = [i for i, item in enumerate(message.items) if item.kind != "patches"]
        if raw:
            patches = preprocess_batch([pieces[i] for i in raw], self.preprocess, device=self.device)
            done = [tuple(g) for g in patches.grid_thw.tolist()]
            if done != [grids[i] for i in raw]:
                raise RuntimeError(f"preprocessing gave grids {done}, the engine planned {[grids[i] for i in raw]}")
            for i, part in zip(raw, patches.pixel_values.split([t * h * w for t, h, w in done])):
                pieces[i] = part
        pixel_values = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (tokens, patch_dim) in the window's order
        return pixel_values, grids

    @torch.inference_mode()
    def _encode(self, message: RunWindow, pixel_values: torch.Tensor, grids: list) -> EncodeResult:
        rows = sum(self.runner.model.geometry.item_rows(*grid) for grid in grids)
        out = self._slot(message, rows)
        return self.runner.encode(pixel_values, grids, out=out, wait=False)

    def _slot(self, message: RunWindow, rows: int) -> torch.Tensor:
        """The leased run as the runner's output tensor (rows, 1 + deepstack, out_hidden)."""
        mapping = self.slabs.get(message.slab)
        if mapping is None:
            raise RuntimeError(f"slab {message.slab} is not one of this worker's ({sorted(self.slabs)})")
        count = rows * self.row_shape[0] * self.row_shape[1]
        used = count * self.runner.dtype.itemsize
        if not (0 <= message.offset and used <= message.run_bytes and message.offset + message.run_bytes <= len(mapping)):
            raise RuntimeError(f"{rows} rows ({used} bytes) at {message.offset} do not fit the run of "
                               f"{message.run_bytes} bytes in slab {message.slab} of {len(mapping)}")
        flat = torch.frombuffer(mapping, dtype=self.runner.dtype, count=count, offset=message.offset)
        return flat.view(rows, *self.row_shape)

    def _clear_rest(self, message: RunWindow, used: int) -> None:
        """Clear what the window's rows leave of its run: no reader of this window can see an earlier
        window's rows there. The host does it after the window's device work is queued (the device
        writes only the rows before it), so it delays nothing. A plain memset: torch would split it over
        its CPU threads, whose spinning afterwards competes with the engine and the clients for cores."""
        if message.run_bytes > used:
            start = ctypes.addressof(ctypes.c_char.from_buffer(self.slabs[message.slab])) + message.offset + used
            ctypes.memset(start, 0, message.run_bytes - used)

    def map_inputs(self, message: MapInputs) -> None:
        """Map an input slab of the engine's (worker_inputs.py); the ones of the start-up are said."""
        began = time.perf_counter()
        self.inputs.map(message)
        if not self.started:
            self.say(f"input slab mapped: {message.size / 2**30:.2f} GiB"
                     f"{' page-locked' if self.device.type == 'cuda' else ''} in {time.perf_counter() - began:.1f} s")

    def make_slabs(self, message: MakeSlabs) -> SlabsMade:
        """Make and seal the output slabs: mapped writable here (and page-locked for the device's
        copies) before the seals, so this process alone can write them."""
        pin = pin_for_cuda if self.device.type == "cuda" else None
        made: list[tuple[str, int, mmap.mmap]] = []
        began = time.perf_counter()
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
        self.say(f"output slabs made: {sum(size for _, size in message.slabs) / 2**30:.2f} GiB"
                 f"{' page-locked' if pin else ''} in {time.perf_counter() - began:.1f} s")
        return SlabsMade([fd for _, fd, _ in made])

    def close(self) -> None:
        self.inputs.close()
        self.slabs.clear()
        for fd in self._slab_descriptors:
            os.close(fd)
        self._slab_descriptors.clear()


def start_progress(spec: WorkerSpec, since: float):
    """A function that says a start-up phase on stderr (when the spec asks for it), with the time since
    `since`: when the engine spawned the process or, for a standby, told it to begin (CLOCK_MONOTONIC
    is one clock for the whole host)."""
    began = since or time.monotonic()

    def say(message: str) -> None:
        if spec.progress:
            seconds = time.monotonic() - began
            event(f"worker {spec.worker} ({spec.device}), {seconds:5.1f} s: {message}", worker=spec.worker,
                  device=spec.device, seconds=round(seconds, 3), phase=message)
    return say
