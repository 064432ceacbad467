"""The worker process: one per device. It loads the model, captures the budget graphs,
reports its capacities and measured cost model, then runs the windows the engine sends.

Each window arrives as one message naming where its items lie in the engine's input slabs
(which the worker maps and page-locks once: ipc/input_slabs.py) and the shared-memory slot its
output rows go to. The items go to the device in one asynchronous copy per run of adjacent
items, raw images and videos are preprocessed there, and the runner's single output copy lands
in the slot, which the engine's clients read in place. The process talks to the engine over one ZeroMQ PAIR socket, and a thread of its own
writes heartbeats into shared memory, which the engine watches for a hung worker (engine/liveness.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from vitserve.ipc.codec import Codec
from vitserve.ipc.input_slabs import InputSlab, aligned
from vitserve.ipc.messages import (
    DropInputs, FromWorker, InputsDropped, MakeSlabs, MapInputs, RunWindow, Shutdown, SlabsMade, ToWorker, WindowDone,
    WindowFailed, WindowItem, WorkerCost, WorkerReady, WorkerStartFailed,
)
from vitserve.ipc.outputs import read_only_tensor
from vitserve.ipc.sealed import SealError, create_sealed
from vitserve.ipc.slabs import SlabError
from vitserve.preprocess import PreprocessConfig, preprocess_batch

from .capacities import WindowConfig
from .cost_cache import cost_cache_path, read_cost, write_cost
from .cost_model import CostModel
from .runner import EncodeResult, ModelRunner

log = logging.getLogger(__name__)

# Windows queued on the device ahead of their replies: the host prepares the next window while
# the GPU runs the current one. (The engine keeps a matching number in flight per worker.)
MAX_RUNNING = 2
# While windows run on the device, the loop sleeps this long between checks for a new window and
# for the oldest one's completion (ZeroMQ polls in whole milliseconds). Blocking on the oldest
# instead would leave a window that arrives meanwhile unprepared until the device is idle: a
# bubble of host work in every window.
RUNNING_POLL_S = 100e-6
ORPHAN_CHECK_MS = 1000  # an idle worker checks this often that the engine that started it still runs
EXIT_DEVICE_FAULT = 3  # exit code after a CUDA error: the context is unusable, the engine restarts us

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


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


class DeviceFault(Exception):
    """A CUDA error: the device context cannot be trusted for any later window."""


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of the spawned process."""
    engine_pid = os.getppid()
    start_heartbeat(spec.beat_at, spec.heartbeat_s)
    logging.basicConfig(level=spec.log_level, format=f"worker {spec.worker}: %(levelname)s %(message)s")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(spec.endpoint)
    encoder = msgspec.msgpack.Encoder()
    try:
        worker = Worker(spec, engine_pid)
        socket.send(encoder.encode(worker.ready))
    except Exception as err:  # report what failed; the engine raises it at start-up
        log.exception("start-up failed")
        socket.send(encoder.encode(WorkerStartFailed(spec.worker, f"{type(err).__name__}: {err}")))
        socket.close()
        context.term()
        return
    try:
        serve_windows(worker, socket, encoder, engine_pid)
    except DeviceFault as fault:  # no reply: the engine retries the window on a fresh worker
        log.error("device fault, exiting: %s", fault)
        os._exit(EXIT_DEVICE_FAULT)
    worker.close()
    socket.close()
    context.term()


def start_heartbeat(beat_at: Any, period_s: float) -> None:
    """Write the time (time.monotonic(), one clock for the whole host) into `beat_at` every
    `period_s` from a daemon thread, so the beats go on while the main thread runs a long window
    (torch releases the GIL in its kernels; Python code yields it every few milliseconds) and stop
    only when the process is stopped or gone. Only this thread writes, so it needs no lock."""
    if beat_at is None:
        return

    def beat() -> None:
        while True:
            beat_at.value = time.monotonic()
            time.sleep(period_s)

    threading.Thread(target=beat, name="vitserve-heartbeat", daemon=True).start()


def serve_windows(worker: Worker, socket: zmq.Socket, encoder: msgspec.msgpack.Encoder, engine_pid: int) -> None:
    """Run the engine's windows until it says Shutdown (or is gone)."""
    codec = Codec(ToWorker)
    running: deque[Running] = deque()  # windows whose GPU work is queued, oldest first

    def reply_oldest() -> None:
        socket.send(encoder.encode(running.popleft().reply()))
        for slab in worker.retire_inputs(running[0].sequence if running else None):
            socket.send(encoder.encode(InputsDropped(slab)))

    while True:
        while running and running[0].finished():
            reply_oldest()
        if len(running) >= MAX_RUNNING:
            reply_oldest()  # full: wait for the oldest
            continue
        if running and not socket.poll(0):
            time.sleep(RUNNING_POLL_S)  # nothing new yet: check the oldest again shortly
            continue
        if not running and not socket.poll(ORPHAN_CHECK_MS):
            if os.getppid() != engine_pid:
                log.error("the engine (pid %d) is gone: exiting", engine_pid)
                return
            continue
        message, frames = codec.decode(socket.recv_multipart(copy=False))
        match message:
            case Shutdown():
                break
            case RunWindow():
                running.append(worker.start(message))
            case MapInputs():
                worker.map_inputs(message)
            case DropInputs(slab=slab):
                worker.drop_inputs(slab)
                if not running:
                    for slab in worker.retire_inputs(None):
                        socket.send(encoder.encode(InputsDropped(slab)))
            case MakeSlabs():
                socket.send(encoder.encode(worker.make_slabs(message)))
    while running:
        socket.send(encoder.encode(running.popleft().reply()))


@dataclass
class Running:
    """A window whose device work is queued; its rows are valid once `result` is done."""

    window: int
    result: EncodeResult | None
    failure: str = ""
    received: float = 0.0  # time.perf_counter() when the window's message arrived
    sequence: int = 0  # windows started before it in this process
    # CUDA timing events: where the device reached the window's first work, the end of its copies,
    # and the end of the window before it (its busy time is counted once where the two overlap)
    began: torch.cuda.Event | None = None
    ended: torch.cuda.Event | None = None
    previous: torch.cuda.Event | None = None

    def finished(self) -> bool:
        try:
            return self.result is None or self.result.done is None or self.result.done.query()
        except Exception as err:  # an asynchronous CUDA error can surface at the query too
            raise DeviceFault(f"window {self.window}: {type(err).__name__}: {err}") from err

    def reply(self) -> FromWorker:
        if self.result is None:
            return WindowFailed(self.window, self.failure)
        try:
            self.result.wait()
        except Exception as err:  # an asynchronous CUDA error surfaces here
            raise DeviceFault(f"window {self.window}: {type(err).__name__}: {err}") from err
        gpu_ms = 0.0
        if self.ended is not None:
            self.ended.synchronize()  # recorded just after the copies' barrier: done with them
            gpu_ms = self.began.elapsed_time(self.ended)
            if self.previous is not None:  # the part of the window before's copies that ran alongside
                gpu_ms -= max(0.0, min(self.began.elapsed_time(self.previous), gpu_ms))
        return WindowDone(self.window, [item.offset for item in self.result.items],
                          (time.perf_counter() - self.received) * 1e3, gpu_ms)


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
        known = None if spec.cost is None else CostModel.from_lists(
            spec.cost.attention_ms_per_token2, spec.cost.padded_base_ms, spec.cost.eager_base_points)
        kept = None if spec.cache_dir is None else cost_cache_path(Path(spec.cache_dir), self.runner)
        if known is None and kept is not None:
            known = read_cost(kept)
            if known is not None and not set(self.runner.padded_shapes()) <= set(known.padded_base_ms):
                known = None  # not this runner's shapes after all: measure them
        graphs = len(self.runner.padded_shapes()) if self.runner.use_graphs else 0
        say(f"loaded; {f'capturing {graphs} graphs, then ' if graphs else ''}"
            f"{'reusing the cost model measured before' if known else 'measuring the cost model'}")
        loaded = time.perf_counter()
        report = self.runner.capture(progress=False, cost=known)
        if known is None and kept is not None:
            write_cost(kept, self.runner.cost)
        capture_s = time.perf_counter() - began
        graphs_s = report.seconds if report is not None else 0.0
        say(f"ready: load {loaded - began:.1f} s, graphs {graphs_s:.1f} s, cost model "
            f"{time.perf_counter() - loaded - graphs_s:.1f} s")
        self.slabs: dict[str, mmap.mmap] = {}  # made when the engine asks, after the handshake
        self._slab_descriptors: list[int] = []  # kept open: the engine opens its own copies through /proc
        self.inputs: dict[str, InputSlab] = {}  # the engine's input slabs, mapped (and page-locked on CUDA)
        self._retiring: list[tuple[int, str]] = []  # (windows started when the drop came, slab)
        self._started = 0  # windows started so far
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
        self._started += 1
        try:
            began = self._timing_event(torch.cuda.current_stream(self.device)) if self.device.type == "cuda" else None
            result = self._encode(message)
            running = Running(message.window, result, received=received, sequence=self._started)
            if began is not None:
                running.began, running.previous = began, self._last_end
                running.ended = self._last_end = self._timing_event(self.runner.copier.copy_stream)
            return running
        except Exception as err:  # the window fails, the worker goes on (unless the device is broken)
            if self.device.type == "cuda" and is_cuda_error(err):
                raise DeviceFault(f"window {message.window}: {type(err).__name__}: {err}") from err
            log.exception("window %d failed", message.window)
            return Running(message.window, None, f"{type(err).__name__}: {err}", received, self._started)

    @staticmethod
    def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    @torch.inference_mode()
    def _encode(self, message: RunWindow) -> EncodeResult:
        grids = [item.grid for item in message.items]
        pieces = self._inputs(message.items)  # each item's array on the device, in the window's order
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

    def _inputs(self, items: list[WindowItem]) -> list[torch.Tensor]:
        """The items' arrays on the device. On CUDA they go up into one device buffer, laid out as
        in their slabs, in one asynchronous copy per run of items adjacent in one slab (page-locked
        memory: no staging, no host allocation)."""
        hosts = []
        for item in items:
            slab = self.inputs.get(item.slab)
            if slab is None:
                raise RuntimeError(f"input slab {item.slab} is not mapped by this worker ({sorted(self.inputs)})")
            hosts.append(slab.array(item.offset, item.dtype, tuple(item.shape)))  # bounds checked
        if self.device.type != "cuda":
            return [read_only_tensor(array) for array in hosts]
        starts = [0]
        for array in hosts:
            starts.append(starts[-1] + aligned(array.nbytes))
        buffer = torch.empty(starts[-1], dtype=torch.uint8, device=self.device)  # (bytes,)
        first = 0
        for end in range(1, len(items) + 1):
            if end < len(items) and items[end].slab == items[first].slab and (
                    items[end].offset - items[first].offset == starts[end] - starts[first]):
                continue  # adjacent in its slab as in the buffer: the same copy takes it
            nbytes = starts[end - 1] - starts[first] + hosts[end - 1].nbytes
            source = torch.frombuffer(self.inputs[items[first].slab].mapping, dtype=torch.uint8, count=nbytes,
                                      offset=items[first].offset)  # (bytes,) page-locked
            buffer[starts[first]:starts[first] + nbytes].copy_(source, non_blocking=True)
            first = end
        return [buffer[start:start + array.nbytes].view(TORCH_DTYPES[item.dtype]).view(array.shape)
                for item, start, array in zip(items, starts, hosts)]

    def map_inputs(self, message: MapInputs) -> None:
        """Map (and on CUDA page-lock) an input slab of the engine's. A slab that cannot be mapped is
        logged; the windows that name it fail, and the worker goes on."""
        if message.slab in self.inputs:
            return
        try:
            slab = InputSlab.open_from(self.engine_pid, message.descriptor, message.slab, message.size)
        except SlabError as err:
            log.error("cannot map input slab: %s", err)
            return
        if self.device.type == "cuda":
            try:
                pin_for_cuda(slab.mapping)
            except RuntimeError as err:
                log.error("cannot page-lock input slab %s: %s", message.slab, err)
                slab.close()
                return
        self.inputs[message.slab] = slab

    def drop_inputs(self, slab: str) -> None:
        """Unmap an input slab once every window started so far is done (see retire_inputs)."""
        self._retiring.append((self._started, slab))

    def retire_inputs(self, oldest_running: int | None) -> list[str]:
        """Unmap the slabs dropped before the oldest window still running (`oldest_running`, its
        sequence; None: none runs): no copy from them can be in flight. Returns their names."""
        done = [(mark, slab) for mark, slab in self._retiring if oldest_running is None or mark < oldest_running]
        if not done:
            return []
        self._retiring = [entry for entry in self._retiring if entry not in done]
        for _, name in done:
            slab = self.inputs.pop(name, None)
            if slab is not None:
                if self.device.type == "cuda":
                    unpin_for_cuda(slab.mapping)
                slab.close()
        return [name for _, name in done]

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
        for slab in self.inputs.values():
            slab.close()
        self.inputs.clear()
        self.slabs.clear()
        for fd in self._slab_descriptors:
            os.close(fd)
        self._slab_descriptors.clear()


def pin_for_cuda(mapping: mmap.mmap) -> None:
    """Register the pages with CUDA (page-locked), so device-to-host copies into them run asynchronously."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    status = torch.cuda.cudart().cudaHostRegister(address, len(mapping), 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {len(mapping)} bytes of output slab failed with status {status}")


def _progress(spec: WorkerSpec):
    """A function that says a start-up phase on stderr (when the spec asks for it), with the time since
    the engine spawned the process (CLOCK_MONOTONIC is one clock for the whole host)."""
    began = spec.spawned_at or time.monotonic()

    def say(message: str) -> None:
        if spec.progress:
            print(f"vitserve: worker {spec.worker} ({spec.device}), {time.monotonic() - began:5.1f} s: {message}",
                  file=sys.stderr, flush=True)
    return say


def unpin_for_cuda(mapping: mmap.mmap) -> None:
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    status = torch.cuda.cudart().cudaHostUnregister(address)
    if int(status) != 0:
        log.warning("cudaHostUnregister of an input slab failed with status %s", status)


def is_cuda_error(err: BaseException) -> bool:
    """Whether `err` comes from the CUDA runtime (sticky: every later call on the context fails too)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(err, accelerator_error)) or "CUDA error" in str(err)
