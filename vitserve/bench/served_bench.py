"""`vitserve bench --served`: the runner alone against the served engine, same workloads, one run.

Runner: the worker's own path in one process, with nothing around it. Raw uint8 items wait in
page-locked host memory; requests go in groups, each uploaded, preprocessed on the device and
encoded, rows copied to page-locked memory, back to back with one synchronisation at the end.
The baseline's groups are what the engine sends its worker at saturation: whole requests up to
the largest budget, one window's worth, preprocessed together (as the worker does per window).
A second runner figure takes groups of BATCH_TOKENS patch tokens: preprocessing batched over
several windows, and the runner packing windows from more items; the ratio against it is
reported too (the engine never preprocesses more than a window at once). The runner stays loaded
beside the server, and each workload's runner baseline is the mean of one measurement right
before its served run and one right after.
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
import signal
import tempfile
import time
from pathlib import Path

import torch

from vitserve.engine.admission import admit
from vitserve.models import load_model
from vitserve.preprocess import PreprocessConfig, preprocess_batch
from vitserve.workers import ModelRunner

from .load import closed_loop, jobs_of, until_settled
from .overhead import run_loop, start_server, stop_server
from .report import write
from .workloads import make_requests

BATCH_TOKENS = 32768  # patch tokens of the requests the runner takes at once for its batched figure
REQUEST_POOL = 32  # distinct requests per workload, sent round-robin
MEASURE_S = 6.0  # each side runs about this long per workload
RESTART_TIMEOUT_S = 600.0


def _runner_images_per_s(runner: ModelRunner, requests: list, config: PreprocessConfig, group_tokens: int) -> float:
    device = runner.device
    pinned = [[torch.from_numpy(item).pin_memory() for item in request] for request in requests]
    tokens = [sum(admit(item, config, 1 << 30).tokens for item in request) for request in requests]
    groups, group, used = [], [], 0
    for request, count in zip(pinned, tokens):
        if group and used + count > group_tokens:
            groups.append(group)
            group, used = [], 0
        group += request
        used += count
    groups.append(group)
    rows = max(sum(admit(i.numpy(), config, 1 << 30).tokens for i in g) for g in groups) // runner.capacities.merge_factor
    out = torch.empty((rows, *runner.window.output.shape[1:]), dtype=runner.dtype, pin_memory=True)

    def one_pass() -> int:
        for items in groups:
            uploaded = [item.to(device, non_blocking=True) for item in items]
            patches = preprocess_batch(uploaded, config, device=device)
            total = patches.pixel_values.shape[0] // runner.capacities.merge_factor
            runner.encode(patches.pixel_values, patches.grid_thw, out=out[:total], wait=False)
        return sum(len(items) for items in groups)

    one_pass()  # warm-up
    torch.cuda.synchronize(device)
    images, began = 0, time.perf_counter()
    while time.perf_counter() - began < MEASURE_S:
        images += one_pass()
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - began)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _served(endpoint: str, requests: list, total: int, concurrency: int) -> dict:
    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        def encode(items, deadline_ms, priority):
            return client.encode(items, deadline_ms, priority)

        jobs = jobs_of(requests, None)
        await closed_loop(encode, jobs, 2 * concurrency, concurrency)  # warm-up
        pid = (await client.health()).pid
        before, cpu_before = await client.stats(), _cpu_seconds(pid)
        result = await closed_loop(encode, jobs, total, concurrency)
        after, cpu_after = await client.stats(), _cpu_seconds(pid)
    row = result.row()
    return {"images_per_s": row["images_per_s"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
            "errors": row["errors"], "requests": total,
            "gpu_busy": (after["gpu_busy_ms"] - before["gpu_busy_ms"]) / (result.seconds * 1e3),
            "engine_cpu_ms_per_request": (cpu_after - cpu_before) * 1e3 / total,
            "items_per_window": (after["items_sent"] - before["items_sent"])
            / max(after["windows_sent"] - before["windows_sent"], 1)}


async def _until_settled(endpoint: str) -> None:
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
                     serve_arguments: list[str]) -> dict:
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
        run_loop(_until_settled(endpoint))
        warm_s = time.perf_counter() - began
        # Each workload's runner figures right before and after its served run (the runner and the
        # server share the device, each idle while the other runs): a device that slows down as it
        # heats up under minutes of load slows both sides alike.
        for name, requests in workloads.items():
            batched = _runner_images_per_s(runner, requests, config, BATCH_TOKENS)
            before = _runner_images_per_s(runner, requests, config, largest)
            images_per_request = sum(map(len, requests)) / len(requests)
            total = max(4 * concurrency, int(before * MEASURE_S / images_per_request))
            served = run_loop(_served(endpoint, requests, total, concurrency))
            after = _runner_images_per_s(runner, requests, config, largest)
            runner_rate = (before + after) / 2
            rows.append({"workload": name, "runner_images_per_s": runner_rate, "runner_before_after": [before, after],
                         "runner_batched_images_per_s": batched, **served,
                         "ratio": served["images_per_s"] / runner_rate,
                         "ratio_batched": served["images_per_s"] / batched})
        restart = run_loop(_restart(endpoint, next(iter(workloads.values()))[0][0]))
    finally:
        stop_server(server, folder)
    return {"model": model, "device": torch.cuda.get_device_name(device), "concurrency": concurrency,
            "serve_flags": serve_arguments,
            "runner_capture_s": capture_s, "serve_start_s": start_s, "serve_warm_s": warm_s, **restart,
            "rows": rows}


def served_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}: runner alone vs `vitserve serve` (ipc://, "
             f"{result['concurrency']} outstanding); runner capture {result['runner_capture_s']:.1f} s, "
             f"serve start to ready {result['serve_start_s']:.1f} s, to warm (every graph captured) "
             f"{result['serve_warm_s']:.1f} s; after a SIGKILL of the worker, a request served in "
             f"{result['restart_serving_s']:.2f} s, warm again in {result['restart_warm_s']:.1f} s; "
             f"serve {' '.join(result['serve_flags'])}; runner: windows up to the largest budget "
             f"(batched: groups of {BATCH_TOKENS} tokens)",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    xs = range(len(rows))
    axis.bar([x - 0.2 for x in xs], [r["runner_images_per_s"] for r in rows], 0.4, label="runner alone")
    axis.bar([x + 0.2 for x in xs], [r["images_per_s"] for r in rows], 0.4, label="vitserve serve")
    for x, r in zip(xs, rows):
        axis.annotate(f"{r['ratio']:.2f}x, GPU {100 * r['gpu_busy']:.0f}%", (x + 0.2, r["images_per_s"]),
                      ha="center", va="bottom", fontsize=8)
    axis.set_xticks(list(xs), [r["workload"] for r in rows])
    axis.set_title(f"images/s at saturation: {result['model']} on {result['device']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
