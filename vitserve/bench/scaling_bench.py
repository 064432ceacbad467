"""`vitserve bench --scaling`: the served engine on one device against the same engine on all of
--devices, per workload, in one run.

Two `vitserve serve` processes stay up side by side: one on the first device, one on every device
(the first included). Per workload they take turns, ROUNDS slices each, so drift of the devices'
clocks under sustained load weighs on both alike; each slice keeps `concurrency` requests outstanding
per device (one client over ipc://). The scaling is the many-device rate over the one-device rate
(ideal: the device count); the busy share is per device (the workers' CUDA events over wall time).
Devices may repeat (`cuda:0,cuda:0`: two workers on one GPU), which exercises the multi-worker
paths where one GPU is all there is; the scaling then says nothing about several GPUs.

Last, with the load still on, the many-device engine's last worker is killed: the requests of that
slice must all succeed (its windows are retried on the others) and the figures say how long until
it served again.
"""

from __future__ import annotations

import os
import platform
import signal
import tempfile
import time

from .load import closed_loop, jobs_of
from .report import paired_bars, write
from .served_bench import ServedSlice, served_row, served_slice, wait_settled
from .server_process import run_loop, start_server, stop_server
from .workloads import make_requests

REQUEST_POOL = 32  # distinct requests per workload, sent round-robin
ROUNDS = 3  # slices per workload and engine, taking turns
SLICE_S = 3.0  # each slice runs about this long
FIRST_SLICE_REQUESTS = 4  # times the requests outstanding: the first slice, before a rate is known
RESTART_TIMEOUT_S = 600.0


def _slices(endpoint: str, requests: list, concurrency: int, rate: float | None, slice_s: float,
            warm_up: bool) -> ServedSlice:
    per_request = sum(map(len, requests)) / len(requests)
    total = FIRST_SLICE_REQUESTS * concurrency if rate is None else max(2 * concurrency, int(rate * slice_s / per_request))
    return run_loop(served_slice(endpoint, requests, total, concurrency, warm_up))


def _rate(piece: ServedSlice) -> float:
    return piece.result.images / piece.result.seconds


async def _kill_one_under_load(endpoint: str, requests: list, total: int, concurrency: int) -> dict:
    """A closed loop of `total` requests on the many-device engine; its last worker is killed once
    the loop is under way. Every request should succeed: the lost windows run again elsewhere."""
    import asyncio

    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        def encode(items, deadline_ms, priority):
            return client.encode(items, deadline_ms, priority)

        pids = (await client.health()).pids_by_worker
        worker = max(pids)  # the last device's
        restarts = (await client.stats())["worker_restarts"]
        loop = asyncio.ensure_future(closed_loop(encode, jobs_of(requests, None), total, concurrency))
        await asyncio.sleep(0.2)
        os.kill(pids[worker], signal.SIGKILL)
        killed = time.perf_counter()
        result = await loop
        async with asyncio.timeout(RESTART_TIMEOUT_S):  # back: restarted, and its new process ready
            while ((await client.stats())["worker_restarts"] <= restarts
                   or (health := await client.health()).pids_by_worker.get(worker, pids[worker]) == pids[worker]
                   or health.workers_ready < health.workers):
                await asyncio.sleep(0.05)
        back_s = time.perf_counter() - killed
        retried = (await client.stats())["windows_retried"]
    return {"requests": result.sent, "completed": result.completed, "errors": dict(result.errors),
            "images_per_s": result.images / result.seconds, "worker_back_s": back_s, "windows_retried": retried}


def run_scaling_bench(model: str, devices: list[str], names: list[str], concurrency: int,
                      serve_arguments: list[str], rounds: int = ROUNDS, slice_s: float = SLICE_S) -> dict:
    if len(devices) < 2:
        raise ValueError(f"--scaling compares one device with several: give --devices two or more, got {devices}")
    workloads = {name: make_requests(name, REQUEST_POOL) for name in names}
    folder = tempfile.mkdtemp(prefix="vitserve-scaling-")
    endpoints = {1: f"ipc://{folder}/one", len(devices): f"ipc://{folder}/all"}
    servers = []
    rows, kill = [], {}
    try:
        for count, endpoint in endpoints.items():
            servers.append(start_server(endpoint, model, ",".join(devices[:count]), serve_arguments))
            run_loop(wait_settled(endpoint))
        for name, requests in workloads.items():
            slices: dict[int, list[ServedSlice]] = {count: [] for count in endpoints}
            for turn in range(rounds):
                for count, endpoint in endpoints.items():
                    rate = _rate(slices[count][0]) if slices[count] else None
                    slices[count].append(_slices(endpoint, requests, concurrency * count, rate, slice_s, turn == 0))
            row = {"workload": name}
            for count, pieces in slices.items():
                figures = served_row(pieces)
                figures["gpu_busy"] /= count  # (per device)
                figures["slices"] = [_rate(piece) for piece in pieces]
                row[f"devices_{count}"] = figures
            one, many = row["devices_1"]["images_per_s"], row[f"devices_{len(devices)}"]["images_per_s"]
            row["scaling"] = many / one if one else 0.0
            rows.append(row)
        requests = next(iter(workloads.values()))
        rate = rows[0][f"devices_{len(devices)}"]["images_per_s"]
        total = max(4 * concurrency * len(devices), int(rate * slice_s / (sum(map(len, requests)) / len(requests))))
        kill = run_loop(_kill_one_under_load(endpoints[len(devices)], requests, total, concurrency * len(devices)))
    finally:
        for server in servers:
            stop_server(server, folder)
    return {"model": model, "devices": devices, "device_names": [_device_name(d) for d in devices],
            "concurrency_per_device": concurrency, "rounds": rounds, "serve_flags": serve_arguments,
            "rows": rows, "kill_one": kill}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or "CPU"


def scaling_table(result: dict) -> str:
    n = len(result["devices"])
    lines = [f"{result['model']}: `vitserve serve` on {result['devices'][0]} against {','.join(result['devices'])} "
             f"({', '.join(sorted(set(result['device_names'])))}); {result['concurrency_per_device']} requests "
             f"outstanding per device, {result['rounds']} slices each, taking turns",
             f"{'workload':<11} {'1 dev img/s':>11} {f'{n} dev img/s':>11} {'scaling':>7} {'ideal':>5} "
             f"{'p50 ms 1/n':>15} {'p99 ms 1/n':>15} {'busy/dev 1/n':>14}"]
    for row in result["rows"]:
        one, many = row["devices_1"], row[f"devices_{n}"]
        lines.append(f"{row['workload']:<11} {one['images_per_s']:11.1f} {many['images_per_s']:11.1f} "
                     f"{row['scaling']:7.2f} {n:5d} {one['p50_ms']:7.1f}/{many['p50_ms']:<7.1f} "
                     f"{one['p99_ms']:7.1f}/{many['p99_ms']:<7.1f} "
                     f"{100 * one['gpu_busy']:6.1f}/{100 * many['gpu_busy']:<6.1f}%"
                     + (f"  errors {one['errors'] or ''} {many['errors'] or ''}" if one["errors"] or many["errors"] else ""))
    kill = result["kill_one"]
    if kill:
        errors = f" (errors {kill['errors']})" if kill["errors"] else ""
        lines.append(f"a worker killed under load on {n} devices: {kill['completed']} of {kill['requests']} requests "
                     f"succeeded{errors}, {kill['images_per_s']:.1f} img/s over that slice, "
                     f"{kill['windows_retried']:.0f} windows retried, all workers ready again after "
                     f"{kill['worker_back_s']:.1f} s")
    return "\n".join(lines)


def write_scaling(result: dict, directory) -> list:
    return write(result, directory, "scaling", scaling_table, plot_scaling)


def plot_scaling(result: dict, path):
    n, rows = len(result["devices"]), result["rows"]
    return paired_bars(path, [r["workload"] for r in rows],
                       ([r["devices_1"]["images_per_s"] for r in rows], [r[f"devices_{n}"]["images_per_s"] for r in rows]),
                       ("1 device", f"{n} devices"), [f"{r['scaling']:.2f}x" for r in rows],
                       f"served images/s: {result['model']} on 1 and {n} devices")
