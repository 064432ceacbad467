"""`vitserve bench --overhead`: what the engine adds to a request, against baselines measured in
the same run.

Three measurements of a request of one image (raw pixels, or already processed: a small
processed image isolates the engine's own costs from the model's):

- raw: a ZeroMQ round trip of the very same frames (the Encode header and the pixels) to an
  echo process that answers with a small reply: the floor of any networked server;
- runner: the worker's own work for the image in this process (preprocessing on the device,
  the runner's encode and its output copy), one at a time and synchronised;
- engine: the request through `vitserve serve` (a subprocess) and `AsyncClient`, released
  after each reply;
- embedded: the request through an `Engine` in this process (`await engine.encode(...)`, the same
  window settings, other settings their defaults): no client socket, the worker process alike.

Latency is the median of sequential requests; throughput is requests per second with many
requests outstanding (the client pipelines them). The added latency is
engine - raw - runner: the frontend, the scheduler, the worker's messages and shared memory;
the embedded engine's is embedded - runner.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import zmq
import zmq.asyncio

from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import Encode, ImageItem, PatchItem

from .server_process import run_loop, start_server, stop_server

PATCH_DIM = 3 * 2 * 16 * 16  # channels x temporal patch x patch²: the Qwen3-VL patch


@dataclass
class Overhead:
    item: str  # what one request carries
    requests: int
    concurrency: int
    raw_p50_ms: float
    runner_p50_ms: float
    engine_p50_ms: float
    worker_mean_ms: float  # in the worker process, from a window's receipt to its reply (sequential phase)
    added_p50_ms: float  # engine - raw - runner
    raw_rps: float
    engine_rps: float
    embedded_p50_ms: float
    embedded_rps: float
    embedded_added_p50_ms: float  # embedded - runner


def _echo(endpoint: str, ready) -> None:
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


async def _time(send_and_wait, requests: int, concurrency: int, after_sequential=None) -> tuple[float, float]:
    """Median sequential latency (ms) and pipelined requests per second."""
    latencies = []
    for _ in range(max(requests // 10, 20)):
        began = time.perf_counter()
        await send_and_wait()
        latencies.append((time.perf_counter() - began) * 1e3)
    if after_sequential is not None:
        await after_sequential()
    left = iter(range(requests))

    async def lane() -> None:
        for _ in left:
            await send_and_wait()

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return statistics.median(latencies), requests / (time.perf_counter() - began)


def make_item(image_side: int | None, grid: tuple[int, int] | None):
    """A raw uint8 image, or an already-processed one: (pixel_values, grid_thw) of a 1 x H x W grid."""
    rng = np.random.default_rng(0)
    if grid is None:
        return rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
    height, width = grid
    values = rng.uniform(-1, 1, (height * width, PATCH_DIM)).astype(np.float32)  # (tokens, patch_dim)
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


async def _raw(endpoint: str, item, requests: int, concurrency: int) -> tuple[float, float]:
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
        return await _time(send_and_wait, requests, concurrency)
    finally:
        receiver.cancel()
        await socket.send_multipart([b"stop"])
        socket.close(0)
        context.term()


async def _engine(endpoint: str, item, requests: int, concurrency: int) -> tuple[float, float, float]:
    """Median sequential latency, pipelined requests per second, and the mean time the worker
    spent per window during the sequential requests."""
    from vitserve.client import AsyncClient

    from .load import until_settled

    async with AsyncClient(endpoint) as client:
        async def send_and_wait() -> None:
            (await client.encode([item])).release()

        await until_settled(client.stats)  # graphs captured, standby loaded: full speed
        for _ in range(50):  # warm-up: first windows, slab mappings
            await send_and_wait()
        before = await client.stats()
        sequential = {}

        async def note_worker_time() -> None:
            after = await client.stats()
            windows = after["windows_sent"] - before["windows_sent"]
            sequential["worker_ms"] = (after["worker_ms"] - before["worker_ms"]) / max(windows, 1)

        p50, rps = await _time(send_and_wait, requests, concurrency, note_worker_time)
        return p50, rps, sequential["worker_ms"]


async def _embedded(model: str, devices: str, window, item, requests: int, concurrency: int) -> tuple[float, float]:
    """Median sequential latency and pipelined requests per second of an engine in this process."""
    from vitserve.engine import Engine, EngineConfig

    from .load import until_settled

    async with Engine(EngineConfig(model=model, devices=tuple(devices.split(",")), window=window)) as engine:
        async def send_and_wait() -> None:
            (await engine.encode([item])).release()

        await until_settled(engine.stats)
        for _ in range(50):  # warm-up, as for the served engine
            await send_and_wait()
        return await _time(send_and_wait, requests, concurrency)


def _runner_p50_ms(model: str, device: str, window, item, threads: int | None, samples: int = 100) -> float:
    """The worker's own work for one item: preprocess on the device (raw images), encode, copy out;
    synchronised; with the worker's torch threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from vitserve.models import load_model
    from vitserve.preprocess import PreprocessConfig, preprocess_batch
    from vitserve.workers import ModelRunner

    torch_device = torch.device(device)
    runner = ModelRunner(load_model(model, device=torch_device), window)
    runner.capture(progress=False)

    def patches() -> tuple[torch.Tensor, list]:
        if isinstance(item, tuple):
            return torch.from_numpy(item[0]).to(torch_device), [item[1]]
        processed = preprocess_batch([item], PreprocessConfig(), device=torch_device)
        return processed.pixel_values, [tuple(g) for g in processed.grid_thw.tolist()]

    rows = patches()[0].shape[0] // runner.capacities.merge_factor
    geometry = runner.model.geometry
    out = torch.empty(rows, 1 + geometry.num_deepstack, geometry.out_hidden_size, dtype=runner.dtype,
                      pin_memory=torch_device.type == "cuda")
    latencies = []
    for _ in range(samples + 10):
        began = time.perf_counter()
        runner.encode(*patches(), out=out, wait=True)
        latencies.append((time.perf_counter() - began) * 1e3)
    del runner
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(latencies[10:])


def run_overhead(model: str, devices: str, window, item, requests: int, concurrency: int,
                 serve_arguments: list[str]) -> Overhead:
    folder = tempfile.mkdtemp(prefix="vitserve-overhead-")
    raw_endpoint, engine_endpoint = f"ipc://{folder}/raw", f"ipc://{folder}/engine"
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    echo = spawn.Process(target=_echo, args=(raw_endpoint, ready), daemon=True)
    echo.start()
    ready.wait(60)
    try:
        raw_p50, raw_rps = run_loop(_raw(raw_endpoint, item, requests, concurrency))
    finally:
        echo.join(5)
        echo.kill()
    from vitserve.engine import EngineConfig

    device = devices.split(",")[0]
    threads = EngineConfig(devices=tuple(devices.split(","))).worker_threads(device)
    runner_p50 = _runner_p50_ms(model, device, window, item, threads)
    server = start_server(engine_endpoint, model, devices, serve_arguments)
    try:
        engine_p50, engine_rps, worker_ms = run_loop(_engine(engine_endpoint, item, requests, concurrency))
    finally:
        stop_server(server, folder)
    embedded_p50, embedded_rps = run_loop(_embedded(model, devices, window, item, requests, concurrency))
    return Overhead(describe(item), requests, concurrency, raw_p50, runner_p50, engine_p50, worker_ms,
                    engine_p50 - raw_p50 - runner_p50, raw_rps, engine_rps, embedded_p50, embedded_rps,
                    embedded_p50 - runner_p50)


def overhead_table(result: Overhead) -> str:
    return "\n".join([
        f"requests of one {result.item}; latency: median of sequential requests; "
        f"throughput: {result.requests} requests, {result.concurrency} outstanding",
        f"{'':<8} {'p50 ms':>8} {'req/s':>9}",
        f"{'raw':<8} {result.raw_p50_ms:>8.3f} {result.raw_rps:>9.0f}   ZeroMQ round trip of the same frames",
        f"{'runner':<8} {result.runner_p50_ms:>8.3f} {'':>9}   preprocess + encode + output copy, in process",
        f"{'engine':<8} {result.engine_p50_ms:>8.3f} {result.engine_rps:>9.0f}   vitserve serve + AsyncClient",
        f"{'worker':<8} {result.worker_mean_ms:>8.3f} {'':>9}   mean per window in the worker process "
        f"(receipt to reply), sequential requests",
        f"{'embedded':<8} {result.embedded_p50_ms:>8.3f} {result.embedded_rps:>9.0f}   Engine in this process",
        f"added p50 (engine - raw - runner): {result.added_p50_ms * 1e3:.0f} µs; "
        f"engine throughput {result.engine_rps / result.raw_rps:.2f}x raw; "
        f"embedded engine added (embedded - runner): {result.embedded_added_p50_ms * 1e3:.0f} µs",
    ])


def as_dict(result: Overhead) -> dict:
    return asdict(result)
