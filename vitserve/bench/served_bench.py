"""`vitserve bench --served`: the runner alone against the served engine, same workloads, one run.

Runner: the worker's own path in one process, with nothing around it. Raw uint8 items wait in
page-locked host memory; requests go in groups, each uploaded, preprocessed on the device and
encoded, rows copied to page-locked memory, back to back with one synchronisation at the end.
The baseline's groups are what the engine sends its worker at saturation: whole requests up to
the largest budget, one window's worth, preprocessed together (as the worker does per window).
A second runner figure takes groups of BATCH_TOKENS patch tokens: preprocessing batched over
several windows, and the runner packing windows from more items; the ratio against it is
reported too (the engine never preprocesses more than a window at once).
The runner stays loaded beside the server and they take turns on the device, a slice of about
SLICE_S each, ROUNDS served slices per workload between ROUNDS + 1 runner slices: a device runs
a minute of load slower than its first seconds (on the H200, the runner alone went from 60 to
50-54 videos/s after 12 s of video-448), and turns expose both sides to the same conditions.
The ratio is the served rate over the mean of the runner's slices; each slice's rate is kept.
Served: `vitserve serve` on the same device (defaults and the budget flags given), one client over
ipc:// keeping `concurrency` requests outstanding. Per workload: images/s of both and their ratio,
the served p50/p99, the share of wall time the device was busy with windows (the worker's CUDA
events, `gpu_busy_ms` in the engine's stats), and the engine process's CPU time per request.
Start: `vitserve serve` to ready (serving, graphs still being captured) and to warm; and after the
workloads, a SIGKILL of the worker: how long until a request sent at once is served, and until
the restarted worker is warm again.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vitserve.engine.admission import admit
from vitserve.models import load_model
from vitserve.preprocess import PreprocessConfig, preprocess_batch
from vitserve.workers import ModelRunner

from .load import LoadResult, closed_loop, jobs_of, until_settled
from .server_process import run_loop, start_server, stop_server
from .report import paired_bars, write
from .workloads import make_requests

BATCH_TOKENS = 32768  # patch tokens of the requests the runner takes at once for its batched figure
REQUEST_POOL = 32  # distinct requests per workload, sent round-robin
ROUNDS = 3  # served slices per workload, each between two runner slices
SLICE_S = 3.0  # each slice runs about this long
RESTART_TIMEOUT_S = 600.0


def _runner_images_per_s(runner: ModelRunner, requests: list, config: PreprocessConfig, group_tokens: int,
                         seconds: float) -> float:
    device = runner.device
    cuda = device.type == "cuda"
    pinned = [[_pinned(torch.from_numpy(item), cuda) for item in request] for request in requests]
    tokens = [sum(admit(item, config, 1 << 30).tokens for item in request) for request in requests]
    groups, group, used, most = [], [], 0, 0
    for request, count in zip(pinned, tokens):
        if group and used + count > group_tokens:
            groups.append(group)
            group, used = [], 0
        group += request
        used += count
        most = max(most, used)
    groups.append(group)
    rows = most // runner.capacities.merge_factor  # of the largest group (at most: Kimi's chunks share rows)
    out = torch.empty((rows, *runner.window.output.shape[1:]), dtype=runner.dtype, pin_memory=cuda)

    def one_pass() -> int:
        for items in groups:
            uploaded = [item.to(device, non_blocking=True) for item in items]
            patches = preprocess_batch(uploaded, config, device=device)
            total = sum(runner.model.geometry.item_rows(*grid) for grid in patches.grid_thw.tolist())
            runner.encode(patches.pixel_values, patches.grid_thw, out=out[:total], wait=False)
        return sum(len(items) for items in groups)

    one_pass()  # warm-up
    _synchronize(device)
    images, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        images += one_pass()
        _synchronize(device)
    return images / (time.perf_counter() - began)


def _pinned(tensor: torch.Tensor, cuda: bool) -> torch.Tensor:
    return tensor.pin_memory() if cuda else tensor


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class ServedSlice:
    result: LoadResult
    gpu_busy_ms: float
    engine_cpu_s: float
    items: int
    windows: int


async def served_slice(endpoint: str, requests: list, total: int, concurrency: int, warm_up: bool) -> ServedSlice:
    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        def encode(items, deadline_ms, priority):
            return client.encode(items, deadline_ms, priority)

        jobs = jobs_of(requests, None)
        # unmeasured first: the new connection's input arena opens meanwhile (the first slice warms the engine too)
        await closed_loop(encode, jobs, (2 if warm_up else 1) * concurrency, concurrency)
        pid = (await client.health()).pid
        before, cpu_before = await client.stats(), _cpu_seconds(pid)
        result = await closed_loop(encode, jobs, total, concurrency)
        after, cpu_after = await client.stats(), _cpu_seconds(pid)
    return ServedSlice(result, after["gpu_busy_ms"] - before["gpu_busy_ms"], cpu_after - cpu_before,
                       int(after["items_sent"] - before["items_sent"]),
                       int(after["windows_sent"] - before["windows_sent"]))


def served_row(slices: list[ServedSlice]) -> dict:
    """The slices' figures together: their requests, over the time they ran."""
    merged, seconds = LoadResult("served"), sum(piece.result.seconds for piece in slices)
    for piece in slices:
        merged.merge(piece.result)
    row = merged.ended(seconds).row()
    return {"images_per_s": row["images_per_s"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
            "errors": row["errors"], "requests": merged.sent,
            "gpu_busy": sum(piece.gpu_busy_ms for piece in slices) / (seconds * 1e3),
            "engine_cpu_ms_per_request": sum(piece.engine_cpu_s for piece in slices) * 1e3 / max(merged.sent, 1),
            "items_per_window": sum(piece.items for piece in slices) / max(sum(piece.windows for piece in slices), 1)}


async def wait_settled(endpoint: str) -> None:
    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        await until_settled(client.stats)


async def _restart(endpoint: str, item) -> dict:
    """Kill the worker, then time a request sent at once (it waits in the queue, or is retried, until a
    worker serves again) and the restarted worker's warm-up."""
    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        (await client.encode([item])).release()
        os.kill((await client.health()).worker_pids[0], signal.SIGKILL)
        killed = time.perf_counter()
        (await client.encode([item])).release()
        serving_s = time.perf_counter() - killed
        async with asyncio.timeout(RESTART_TIMEOUT_S):  # (served again, so restarted: warm soon)
            while (stats := await client.stats())["worker_restarts"] < 1 or stats["workers_warming"]:
                await asyncio.sleep(0.05)
        return {"restart_serving_s": serving_s, "restart_warm_s": time.perf_counter() - killed}


def run_served_bench(model: str, device: str, window, names: list[str], concurrency: int,
                     serve_arguments: list[str], rounds: int = ROUNDS, slice_s: float = SLICE_S) -> dict:
    config = PreprocessConfig()
    workloads = {name: make_requests(name, REQUEST_POOL) for name in names}
    runner = ModelRunner(load_model(model, device=torch.device(device)), window)
    began = time.perf_counter()
    runner.capture(progress=False)
    capture_s = time.perf_counter() - began
    largest = runner.capacities.max_budget
    folder = tempfile.mkdtemp(prefix="vitserve-served-")
    endpoint = f"ipc://{folder}/engine"
    began = time.perf_counter()
    server = start_server(endpoint, model, device, serve_arguments)
    start_s = time.perf_counter() - began
    rows, restart = [], {}
    try:
        run_loop(wait_settled(endpoint))
        warm_s = time.perf_counter() - began
        for name, requests in workloads.items():
            batched = _runner_images_per_s(runner, requests, config, BATCH_TOKENS, slice_s)
            runner_rates, slices = [], []
            images_per_request = sum(map(len, requests)) / len(requests)
            for turn in range(rounds):
                runner_rates.append(_runner_images_per_s(runner, requests, config, largest, slice_s))
                total = max(2 * concurrency, int(runner_rates[0] * slice_s / images_per_request))
                slices.append(run_loop(served_slice(endpoint, requests, total, concurrency, warm_up=turn == 0)))
            runner_rates.append(_runner_images_per_s(runner, requests, config, largest, slice_s))
            served, runner_rate = served_row(slices), sum(runner_rates) / len(runner_rates)
            rows.append({"workload": name, "runner_images_per_s": runner_rate, "runner_slices": runner_rates,
                         "served_slices": [piece.result.images / piece.result.seconds for piece in slices],
                         "runner_batched_images_per_s": batched, **served,
                         "ratio": served["images_per_s"] / runner_rate,
                         "ratio_batched": served["images_per_s"] / batched})
        restart = run_loop(_restart(endpoint, next(iter(workloads.values()))[0][0]))
    finally:
        stop_server(server, folder)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "CPU"
    return {"model": model, "device": name, "concurrency": concurrency, "rounds": rounds,
            "serve_flags": serve_arguments,
            "runner_capture_s": capture_s, "serve_start_s": start_s, "serve_warm_s": warm_s, **restart,
            "rows": rows}


def served_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}: runner alone vs `vitserve serve` (ipc://, "
             f"{result['concurrency']} outstanding); runner capture {result['runner_capture_s']:.1f} s, "
             f"serve start to ready {result['serve_start_s']:.1f} s, to warm (every graph captured) "
             f"{result['serve_warm_s']:.1f} s; after a SIGKILL of the worker, a request served in "
             f"{result['restart_serving_s']:.2f} s, warm again in {result['restart_warm_s']:.1f} s; "
             f"serve {' '.join(result['serve_flags'])}; runner: windows up to the largest budget, taking turns with "
             f"the server ({result['rounds']} served slices) (batched: groups of {BATCH_TOKENS} tokens)",
             f"{'workload':<11} {'runner img/s':>12} {'served img/s':>12} {'ratio':>6} {'batched img/s':>13} "
             f"{'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} {'GPU busy':>8} {'engine CPU ms/req':>17} {'items/window':>12}"]
    for r in result["rows"]:
        lines.append(f"{r['workload']:<11} {r['runner_images_per_s']:12.1f} {r['images_per_s']:12.1f} "
                     f"{r['ratio']:6.2f} {r['runner_batched_images_per_s']:13.1f} {r['ratio_batched']:6.2f} "
                     f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {100 * r['gpu_busy']:7.1f}% "
                     f"{r['engine_cpu_ms_per_request']:17.3f} {r['items_per_window']:12.1f}" + (f"  errors {r['errors']}" if r["errors"] else ""))
    return "\n".join(lines)


def write_served(result: dict, directory: Path) -> list[Path]:
    return write(result, directory, "served", served_table, plot_served)


def plot_served(result: dict, path: Path) -> Path:
    rows = result["rows"]
    return paired_bars(path, [r["workload"] for r in rows],
                       ([r["runner_images_per_s"] for r in rows], [r["images_per_s"] for r in rows]),
                       ("runner alone", "vitserve serve"),
                       [f"{r['ratio']:.2f}x, GPU {100 * r['gpu_busy']:.0f}%" for r in rows],
                       f"images/s at saturation: {result['model']} on {result['device']}")
