"""Bursts of concurrent requests against `vitserve serve`, looking for stalls: a burst whose rate
falls far below the others, and what the engine and its worker were doing meanwhile.

Each burst sends `--requests` requests of one raw uint8 image with `--concurrency` outstanding
(as the overhead bench's throughput step does), then a few sequential ones. Per burst it prints
the rate, the latencies, the gaps between consecutive results longer than `--gap-ms`, and what the
engine's stats say changed (windows, worker and device milliseconds). Meanwhile the server (run
through `serve_watched`) prints to stderr, with CLOCK_MONOTONIC times to match against the bursts':
every worker step slower than `--slow-ms` (window start, inputs, preprocessing, encode, slab
mapping, warm-up steps; a reply whose device span exceeds it) and every garbage collection pause
over 10 ms in the engine and the worker. The product's code is not changed: methods are wrapped at
run time, as tools/trace_hops.py does.

    python3 tools/burst_stalls.py --model random:qwen3-vl-8b --device cuda:0 --image-side 448 --bursts 30
    .venv/bin/python tools/burst_stalls.py --model random:tiny --device cpu --image-side 64 --bursts 3

Flags this tool does not know go to `vitserve serve` (e.g. --busy-poll-ms 0).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import statistics
import sys
import tempfile
import time

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
GC_PAUSE_MS = 10.0


def say(text: str) -> None:
    sys.stderr.write(f"[{time.monotonic():.3f}] {text}\n")


def watch_gc(role: str) -> None:
    began = [0.0]

    def pause(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        elif (ms := (time.perf_counter() - began[0]) * 1e3) > GC_PAUSE_MS:
            say(f"{role} (pid {os.getpid()}): gc of generation {info['generation']} paused {ms:.1f} ms")

    gc.callbacks.append(pause)


def slow(function, label: str, slow_ms: float):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if (ms := (time.perf_counter() - began) * 1e3) > slow_ms:
                say(f"worker: {label} took {ms:.1f} ms")
    return timed


# -- the server (its engine and its workers) --------------------------------------------------
def serve_watched(slow_ms: float, argv: list[str]) -> None:
    """The CLI with `argv` (`serve ...`), watched."""
    from vitserve import cli, launch
    from vitserve.engine import worker_handle

    watch_gc("engine")
    # Both entry points are looked up by name when a worker is spawned (see tools/trace_hops.py).
    launch.run_worker = worker_handle.worker_main = functools.partial(watched_worker_main, slow_ms)
    sys.exit(cli.main(argv))


def watched_worker_main(slow_ms: float, spec) -> None:
    from vitserve.workers import worker
    from vitserve.workers.process import worker_main
    from vitserve.workers.running import Running
    from vitserve.workers.worker_inputs import WorkerInputs

    watch_gc("worker")
    for name in ("start", "_inputs", "_encode", "map_inputs", "make_slabs", "warm_step"):
        setattr(worker.Worker, name, slow(getattr(worker.Worker, name), f"Worker.{name}", slow_ms))
    WorkerInputs.on_device = slow(WorkerInputs.on_device, "WorkerInputs.on_device", slow_ms)
    worker.preprocess_batch = slow(worker.preprocess_batch, "preprocess_batch", slow_ms)  # imported by name
    reply = Running.reply

    def watched_reply(self):
        message = reply(self)
        # (the device's span where there is one; on the CPU, from the window's receipt to its reply)
        spent = getattr(message, "gpu_ms", 0.0) or getattr(message, "worker_ms", 0.0)
        if spent > slow_ms:
            say(f"worker: window {self.window} took {spent:.1f} ms (preprocess {message.preprocess_ms:.1f}, "
                f"transfer {message.transfer_ms:.1f}; runs {message.runs})")
        return message

    Running.reply = watched_reply
    worker_main(spec)


# -- the client -----------------------------------------------------------------------------
async def burst(client, item, requests: int, concurrency: int, gap_ms: float) -> str:
    left = iter(range(requests))
    spans: list[tuple[float, float]] = []

    async def lane() -> None:
        for _ in left:
            began = time.monotonic()
            (await client.encode([item])).release()
            spans.append((began, time.monotonic()))

    before = await client.stats()
    began = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    ended = time.monotonic()
    after = await client.stats()
    latencies = sorted((end - start) * 1e3 for start, end in spans)
    ends = sorted(end for _, end in spans)
    gaps = [f"{(ends[i] - ends[i - 1]) * 1e3:.0f} ms after {ends[i - 1]:.3f}" for i in range(1, len(ends))
            if ends[i] - ends[i - 1] > gap_ms / 1e3]
    changed = {key: round(after[key] - before[key], 1) for key in ("windows_sent", "worker_ms", "gpu_busy_ms")}
    return (f"[{began:.3f} - {ended:.3f}] {requests / (ended - began):7.1f} req/s, p50 {statistics.median(latencies):.1f} "
            f"ms, max {latencies[-1]:.1f} ms; {changed}; gaps over {gap_ms:g} ms: {gaps or 'none'}")


async def run_bursts(endpoint: str, args: argparse.Namespace) -> None:
    import numpy as np

    from vitserve.bench.load import until_settled
    from vitserve.client import AsyncClient

    item = np.random.default_rng(0).integers(0, 256, (args.image_side, args.image_side, 3), dtype=np.uint8)
    async with AsyncClient(endpoint) as client:
        await until_settled(client.stats)
        for _ in range(50):  # warm-up, one at a time
            (await client.encode([item])).release()
        for _ in range(args.bursts):
            print(await burst(client, item, args.requests, args.concurrency, args.gap_ms), flush=True)
            for _ in range(20):  # sequential requests between bursts, as the overhead bench has them
                (await client.encode([item])).release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--bursts", type=int, default=20)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    parser.add_argument("--slow-ms", type=float, default=50.0)
    args, extra = parser.parse_known_args()
    sys.path.insert(0, os.path.dirname(TOOLS_DIR))
    from vitserve.bench.server_process import run_loop, start_server, stop_server

    folder = tempfile.mkdtemp(prefix="vitserve-bursts-")
    endpoint = f"ipc://{folder}/engine"
    # `python -c`, not this script, so that spawn does not import the script again in the worker
    code = f"import sys; sys.path.insert(0, {TOOLS_DIR!r}); import burst_stalls; " \
           f"burst_stalls.serve_watched(float(sys.argv[1]), sys.argv[2:])"
    server = start_server(endpoint, args.model, args.device, extra, launcher=(sys.executable, "-c", code, str(args.slow_ms)))
    try:
        run_loop(run_bursts(endpoint, args))
    finally:
        stop_server(server, folder)

if __name__ == "__main__":
    main()
