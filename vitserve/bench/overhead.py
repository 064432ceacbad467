"""`vitserve bench --overhead`: what the engine adds to a request, against baselines measured in
the same run.

Four measurements of a request of one image (raw pixels, or already processed: a small
processed image isolates the engine's own costs from the model's):

- raw: a ZeroMQ round trip of the very same frames (the Encode header and the pixels) to an
  echo process that answers with a small reply: the floor of any networked server;
- runner: the worker's own work for the image in this process (preprocessing on the device,
  the runner's encode and its output copy), one at a time and synchronised;
- engine: the request through `vitserve serve` (a subprocess) and `AsyncClient`, released
  after each reply;
- embedded: the request through an `Engine` in this process (`await engine.encode(...)`, the same
  window settings, other settings their defaults): no client socket, the worker process alike.

All four are alive at once and take turns (raw, runner, engine, embedded; `rounds` times), so a
drift of the device's clocks or the host's load during the run weighs on each of them alike: the
differences are what the engine adds, not when each was measured. Latency is the median of
sequential requests; throughput is requests per second with many
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
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

from .overhead_baselines import InProcessRunner, describe, echo_server, raw_round_trip
from .server_process import run_loop, start_server, stop_server

ROUNDS = 5  # turns each latency takes; each turn is requests / ROUNDS sequential requests


@dataclass
class Overhead:
    item: str  # what one request carries
    requests: int
    concurrency: int
    rounds: int  # turns each latency took, in the same order every round
    raw_p50_ms: float
    runner_p50_ms: float
    engine_p50_ms: float
    worker_mean_ms: float  # in the worker process, from a window's receipt to its reply (sequential phase)
    worker_gpu_mean_ms: float  # of which the device was busy with the window (its CUDA events; 0 on the CPU)
    polled_share: float  # of the served engine's window replies in the sequential phase: found while it polled
    added_p50_ms: float  # engine - raw - runner
    raw_rps: float
    engine_rps: float
    embedded_p50_ms: float
    embedded_rps: float
    embedded_added_p50_ms: float  # embedded - runner
    # where an embedded request's time goes (means over the sequential turns, ms; engine/latencies.py's
    # stages): admission to dispatch, dispatch to the worker's reply and in the worker, its device
    # time, admission to result
    embedded_stages_ms: dict[str, float]


async def _sequential(send_and_wait, count: int) -> list[float]:
    """Latencies (ms) of `count` requests one after another."""
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        await send_and_wait()
        latencies.append((time.perf_counter() - began) * 1e3)
    return latencies


async def _throughput(send_and_wait, requests: int, concurrency: int) -> float:
    """Requests per second with `concurrency` of them outstanding."""
    left = iter(range(requests))

    async def lane() -> None:
        for _ in left:
            await send_and_wait()

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return requests / (time.perf_counter() - began)


async def _measure(model: str, devices: str, window, item, requests: int, concurrency: int, raw_endpoint: str,
                   engine_endpoint: str, rounds: int, busy_poll_ms: float | None) -> Overhead:
    """Every measurement against every other, taking turns: the four latencies are medians over
    `rounds` turns each (a drift of the device's or the host's speed during the run weighs on all
    of them alike); then the three throughputs."""
    from vitserve.client import AsyncClient
    from vitserve.engine import Engine, EngineConfig

    from .load import until_settled

    config = EngineConfig(model=model, devices=tuple(devices.split(",")), window=window, busy_poll_ms=busy_poll_ms)
    device = config.devices[0]
    runner = InProcessRunner(model, device, window, item, config.worker_threads(device), config.preprocess)
    async with AsyncExitStack() as stack:
        stack.callback(runner.close)
        raw = await stack.enter_async_context(raw_round_trip(raw_endpoint, item))
        client = await stack.enter_async_context(AsyncClient(engine_endpoint))
        engine = await stack.enter_async_context(Engine(config))

        async def served() -> None:
            (await client.encode([item])).release()

        async def embedded() -> None:
            (await engine.encode([item])).release()

        await until_settled(client.stats)  # graphs captured, standby loaded: full speed
        await until_settled(engine.stats)
        turns = {"raw": raw, "runner": runner, "engine": served, "embedded": embedded}
        latencies: dict[str, list[float]] = {name: [] for name in turns}
        for send_and_wait in turns.values():
            await _sequential(send_and_wait, 50)  # warm-up: first windows, slab mappings
        before, stages_before = await client.stats(), (engine.stats(), engine.latencies.snapshot())
        per_turn = max(requests // rounds, 20)
        for _ in range(rounds):
            for name, send_and_wait in turns.items():
                latencies[name] += await _sequential(send_and_wait, per_turn)
        after = await client.stats()
        worker_ms, worker_gpu_ms = _worker_means(before, after)
        windows = max(after["windows_sent"] - before["windows_sent"], 1)
        polled = (after["replies_polled"] - before["replies_polled"]) / windows
        embedded_stages = _stage_means(*stages_before, engine.stats(), engine.latencies.snapshot())
        rps = {name: await _throughput(turns[name], requests, concurrency) for name in ("raw", "engine", "embedded")}
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    return Overhead(describe(item), requests, concurrency, rounds, p50["raw"], p50["runner"], p50["engine"], worker_ms,
                    worker_gpu_ms, polled,
                    p50["engine"] - p50["raw"] - p50["runner"], rps["raw"], rps["engine"], p50["embedded"],
                    rps["embedded"], p50["embedded"] - p50["runner"], embedded_stages)


def _worker_means(before: dict, after: dict) -> tuple[float, float]:
    """Between two snapshots of an engine's stats: milliseconds per window in its workers (receipt
    to reply), and of them the device's (0 on the CPU)."""
    windows = max(after["windows_sent"] - before["windows_sent"], 1)
    return ((after["worker_ms"] - before["worker_ms"]) / windows,
            (after["gpu_busy_ms"] - before["gpu_busy_ms"]) / windows)


def _stage_means(stats_before: dict, before: dict, stats_after: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per window between two snapshots of an engine's stats and histograms."""
    in_worker, device = _worker_means(stats_before, stats_after)

    def mean(stage: str) -> float:
        count = after[stage][1][-1] - before[stage][1][-1]
        return (after[stage][2] - before[stage][2]) / max(count, 1) * 1e3

    return {"admission_to_dispatch": mean("queue_wait"), "dispatch_to_reply": mean("window_run"),
            "in_worker": in_worker, "device": device,
            "admission_to_result": mean("end_to_end")}


def run_overhead(model: str, devices: str, window, item, requests: int, concurrency: int,
                 serve_arguments: list[str], rounds: int = ROUNDS, busy_poll_ms: float | None = None) -> Overhead:
    """`busy_poll_ms`: the embedded engine's (serve's comes with `serve_arguments`); None: its default."""
    folder = tempfile.mkdtemp(prefix="vitserve-overhead-")
    raw_endpoint, engine_endpoint = f"ipc://{folder}/raw", f"ipc://{folder}/engine"
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    echo = spawn.Process(target=echo_server, args=(raw_endpoint, ready), daemon=True)
    echo.start()
    ready.wait(60)
    try:
        server = start_server(engine_endpoint, model, devices, serve_arguments)
        try:
            return run_loop(_measure(model, devices, window, item, requests, concurrency, raw_endpoint,
                                     engine_endpoint, rounds, busy_poll_ms))
        finally:
            stop_server(server, folder)
    finally:
        echo.join(5)
        echo.kill()


def overhead_table(result: Overhead) -> str:
    stages = result.embedded_stages_ms
    return "\n".join([
        f"requests of one {result.item}; latency: median of sequential requests, the four taking "
        f"{result.rounds} turns each; "
        f"throughput: {result.requests} requests, {result.concurrency} outstanding",
        f"{'':<8} {'p50 ms':>8} {'req/s':>9}",
        f"{'raw':<8} {result.raw_p50_ms:>8.3f} {result.raw_rps:>9.0f}   ZeroMQ round trip of the same frames",
        f"{'runner':<8} {result.runner_p50_ms:>8.3f} {'':>9}   preprocess + encode + output copy, in process",
        f"{'engine':<8} {result.engine_p50_ms:>8.3f} {result.engine_rps:>9.0f}   vitserve serve + AsyncClient",
        f"{'worker':<8} {result.worker_mean_ms:>8.3f} {'':>9}   mean per window in the worker process "
        f"(receipt to reply), sequential requests; the device busy {result.worker_gpu_mean_ms:.3f} ms of it; "
        f"{result.polled_share:.0%} of the replies found by polling",
        f"{'embedded':<8} {result.embedded_p50_ms:>8.3f} {result.embedded_rps:>9.0f}   Engine in this process",
        f"added p50 (engine - raw - runner): {result.added_p50_ms * 1e3:.0f} µs; "
        f"engine throughput {result.engine_rps / result.raw_rps:.2f}x raw; "
        f"embedded engine added (embedded - runner): {result.embedded_added_p50_ms * 1e3:.0f} µs",
        f"embedded, per request (means, ms): admission to dispatch {stages['admission_to_dispatch']:.3f}, "
        f"dispatch to the worker's reply {stages['dispatch_to_reply']:.3f} (in the worker "
        f"{stages['in_worker']:.3f}, of it the device {stages['device']:.3f}), admission to result "
        f"{stages['admission_to_result']:.3f}",
    ])


def as_dict(result: Overhead) -> dict:
    return asdict(result)
