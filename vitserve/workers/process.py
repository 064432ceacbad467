"""The worker process: one per device. It loads the model, captures the budget graphs,
reports its capacities and measured cost model, then runs the windows the engine sends.

Each window arrives as one message with the items' pixels as zero-copy frames and the
shared-memory slot its output rows go to; raw images and videos are preprocessed on the
device; the runner's single output copy lands in the slot, which the engine's clients read
in place. The process talks to the engine over one ZeroMQ PAIR socket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
import zmq

from vitserve.ipc.codec import Codec, frame_array
from vitserve.ipc.messages import (
    FromWorker, RunWindow, Shutdown, ToWorker, WindowDone, WindowFailed, WorkerCost, WorkerReady,
    WorkerStartFailed,
)
from vitserve.ipc.slab_maps import writable_slab
from vitserve.ipc.slabs import SHM_DIR
from vitserve.preprocess import PreprocessConfig, preprocess_batch

from .capacities import WindowConfig
from .runner import ModelRunner

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    slab_directory: Path = SHM_DIR  # where the engine creates the output slabs
    threads: int | None = None  # torch CPU threads (CPU workers share the host)
    log_level: int = logging.WARNING


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=spec.log_level, format=f"worker {spec.worker}: %(levelname)s %(message)s")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(spec.endpoint)
    encoder = msgspec.msgpack.Encoder()
    try:
        worker = Worker(spec)
        socket.send(encoder.encode(worker.ready))
    except Exception as err:  # report what failed; the engine raises it at start-up
        log.exception("start-up failed")
        socket.send(encoder.encode(WorkerStartFailed(spec.worker, f"{type(err).__name__}: {err}")))
        socket.close()
        context.term()
        return
    codec = Codec(ToWorker)
    while True:
        message, frames = codec.decode(socket.recv_multipart(copy=False))
        match message:
            case Shutdown():
                break
            case RunWindow():
                socket.send(encoder.encode(worker.run(message, frames)))
    worker.close()
    socket.close()
    context.term()


class Worker:
    def __init__(self, spec: WorkerSpec):
        from vitserve.models import load_model

        self.spec = spec
        self.device = torch.device(spec.device)
        began = time.perf_counter()
        model = load_model(spec.model, device=self.device, dtype=TORCH_DTYPES.get(spec.dtype) if spec.dtype else None)
        self.runner = ModelRunner(model, spec.window)
        self.runner.capture(progress=False)
        capture_s = time.perf_counter() - began
        self.slabs: dict[str, object] = {}  # mapped on first use: the engine creates them after the handshake
        geometry = model.geometry
        self.row_shape = (1 + geometry.num_deepstack, geometry.out_hidden_size)
        caps, cost = self.runner.capacities, self.runner.cost
        self.ready = WorkerReady(
            worker=spec.worker, device=str(self.device), budgets=caps.budgets, max_items=caps.max_items,
            max_sequences=caps.max_sequences, merge_factor=caps.merge_factor,
            out_hidden=geometry.out_hidden_size, num_deepstack=geometry.num_deepstack,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            cost=WorkerCost(cost.attention_ms_per_token2,
                            [(b, s, ms) for (b, s), ms in cost.padded_base_ms.items()],
                            list(cost.eager_base_points)),
            capture_s=capture_s,
        )

    def run(self, message: RunWindow, frames: list[memoryview]) -> FromWorker:
        try:
            rows = self._encode(message, frames)
        except Exception as err:  # the window fails, the worker goes on
            log.exception("window %d failed", message.window)
            return WindowFailed(message.window, f"{type(err).__name__}: {err}")
        return WindowDone(message.window, rows)

    @torch.inference_mode()
    def _encode(self, message: RunWindow, frames: list[memoryview]) -> list[int]:
        grids = [item.grid for item in message.items]
        pieces: list[torch.Tensor | None] = [None] * len(grids)
        raw = [i for i, item in enumerate(message.items) if item.kind != "patches"]
        if raw:
            pixels = [frame_array(message.items[i].data, frames) for i in raw]
            patches = preprocess_batch(pixels, self.spec.preprocess, device=self.device)
            done = [tuple(g) for g in patches.grid_thw.tolist()]
            if done != [grids[i] for i in raw]:
                raise RuntimeError(f"preprocessing gave grids {done}, the engine planned {[grids[i] for i in raw]}")
            for i, part in zip(raw, patches.pixel_values.split([t * h * w for t, h, w in done])):
                pieces[i] = part
        for i, item in enumerate(message.items):
            if item.kind == "patches":
                pieces[i] = torch.from_numpy(np.asarray(frame_array(item.data, frames))).to(self.device)
        pixel_values = torch.cat(pieces)  # (tokens, patch_dim) in the window's order
        rows = pixel_values.shape[0] // self.runner.capacities.merge_factor
        out = self._slot(message.slab, message.offset, rows)
        result = self.runner.encode(pixel_values, grids, out=out)
        return [item.offset for item in result.items]

    def _slot(self, slab: str, offset: int, rows: int) -> torch.Tensor:
        """The leased slot as the runner's output tensor (rows, 1 + deepstack, out_hidden)."""
        if slab not in self.slabs:
            self.slabs[slab] = writable_slab(slab, self.spec.slab_directory, pin=self.device.type == "cuda")
        count = rows * self.row_shape[0] * self.row_shape[1]
        flat = torch.frombuffer(self.slabs[slab], dtype=self.runner.dtype, count=count, offset=offset)
        return flat.view(rows, *self.row_shape)

    def close(self) -> None:
        self.slabs.clear()
