"""The overhead bench's baselines (overhead.py), measured in the same run as the engine: a raw
ZeroMQ round trip of a request's frames to an echo process, and the worker's own work for the
item in this process; and the item itself (a raw image, or already-processed patches)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import numpy as np
import zmq
import zmq.asyncio

from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import Encode, ImageItem, PatchItem


def make_item(image_side: int | None, grid: tuple[int, int] | None, patch_dim: int = 3 * 2 * 16 * 16):
    """A raw uint8 image, or an already-processed one: (pixel_values, grid_thw) of a 1 x H x W grid
    with rows `patch_dim` wide (the model's channels x temporal patch x patch²; Qwen3-VL's by default)."""
    rng = np.random.default_rng(0)
    if grid is None:
        return rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
    height, width = grid
    values = rng.uniform(-1, 1, (height * width, patch_dim)).astype(np.float32)  # (tokens, patch_dim)
    return values, (1, height, width)


def describe(item) -> str:
    if isinstance(item, tuple):
        _, (t, h, w) = item
        return f"processed image, grid {t}x{h}x{w}"
    return f"{item.shape[0]}x{item.shape[1]} uint8 image"


def _wire_item(item):
    if isinstance(item, tuple):
        values, grid = item
        return PatchItem(array_ref(values, 0), grid), values
    return ImageItem(array_ref(item, 0)), item


@asynccontextmanager
async def raw_round_trip(endpoint: str, item):
    """The raw baseline's request: the item's Encode frames to the echo process and its reply back."""
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    codec = client_codec()
    waiting: dict[int, asyncio.Future] = {}
    ids = iter(range(1 << 62))
    loop = asyncio.get_running_loop()

    async def receive() -> None:  # replies in order: the echo answers one at a time
        while True:
            await socket.recv_multipart(copy=False)
            waiting.pop(min(waiting)).set_result(None)

    async def send_and_wait() -> None:
        request_id = next(ids)
        wire, array = _wire_item(item)
        frames = codec.encode(Encode(request_id, [wire]), [array])
        waiting[request_id] = future = loop.create_future()
        await socket.send_multipart(frames, copy=False)
        await future

    receiver = asyncio.ensure_future(receive())
    try:
        yield send_and_wait
    finally:
        receiver.cancel()
        await socket.send_multipart([b"stop"])
        socket.close(0)
        context.term()


class InProcessRunner:
    """The worker's own work for one item, in this process: preprocess on the device (raw images),
    encode, copy out; synchronised; with the worker's torch threads."""

    def __init__(self, model: str, device: str, window, item, threads: int | None, preprocess):
        import torch

        if threads:
            torch.set_num_threads(threads)
        from vitserve.models import load_model
        from vitserve.workers import ModelRunner

        self.item, self.device, self.preprocess = item, torch.device(device), preprocess  # (the engine's)
        self.runner = ModelRunner(load_model(model, device=self.device), window)
        self.runner.capture(progress=False)
        geometry = self.runner.model.geometry
        rows = sum(geometry.item_rows(*grid) for grid in self._patches()[1])
        self.out = torch.empty(rows, 1 + geometry.num_deepstack, geometry.out_hidden_size, dtype=self.runner.dtype,
                               pin_memory=self.device.type == "cuda")  # (rows, 1 + deepstack, out_hidden)

    def _patches(self):
        import torch

        from vitserve.preprocess import preprocess_batch

        if isinstance(self.item, tuple):
            return torch.from_numpy(self.item[0]).to(self.device), [self.item[1]]
        processed = preprocess_batch([self.item], self.preprocess, device=self.device)
        return processed.pixel_values, [tuple(g) for g in processed.grid_thw.tolist()]

    async def __call__(self) -> None:
        self.runner.encode(*self._patches(), out=self.out, wait=True)

    def close(self) -> None:
        import torch

        del self.runner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def echo_server(endpoint: str, ready) -> None:
    """The raw baseline's server: answer every message with a small reply, as fast as ZeroMQ goes."""
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(endpoint)
    ready.set()
    reply = b"\x00" * 64  # about the size of a Result header
    while True:
        identity, *frames = socket.recv_multipart(copy=False)
        if frames[0].bytes == b"stop":
            break
        socket.send_multipart([identity, reply], copy=False)
    socket.close(0)
    context.term()
