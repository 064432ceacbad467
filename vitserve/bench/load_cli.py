"""`vitserve bench --endpoint` and `vitserve bench --compare-policies`: load through the engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys

from .load import closed_loop, open_loop, poisson_arrivals
from .policies import compare_policies, policy_table
from .workloads import make_jobs

REQUEST_POOL = 32  # distinct requests per workload, sent round-robin (making large images is slow)


def run(args: argparse.Namespace, window) -> int:
    if args.overhead:
        return _overhead(args, window)
    if args.served:
        return _served(args, window)
    if args.scaling:
        return _scaling(args, window)
    jobs = [job for name in args.workloads.split(",") for job in make_jobs(name, REQUEST_POOL, args.deadline_ms)]
    if args.compare_policies:
        if args.rounds < 1:
            return fail(f"--rounds must be at least 1, got {args.rounds}")
        from vitserve.engine import Engine, EngineConfig

        config = EngineConfig(model=args.model, devices=tuple(args.devices.split(",")), window=window,
                              output_windows=args.output_windows)

        async def compare() -> dict:
            async with Engine(config) as engine:
                return await compare_policies(engine, jobs, args.load, args.duration,
                                              ("deadline", "immediate", "max_delay"), args.max_delay_ms,
                                              rounds=args.rounds)

        report = asyncio.run(compare())
        print(policy_table(report))
    else:
        report = asyncio.run(_against_endpoint(args, jobs))
        print(json.dumps(report, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("policies.json" if args.compare_policies else "load.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


def _serve_arguments(args: argparse.Namespace, window) -> list[str]:
    """`vitserve serve` flags for the same budgets, then --serve-flags."""
    serve = ["--min-budget", str(window.min_budget), "--max-budget", str(window.max_budget)]
    if window.budgets:
        serve += ["--budgets", ",".join(map(str, window.budgets))]
    if window.extra_budgets:
        serve += ["--extra-budgets", ",".join(map(str, window.extra_budgets))]
    if args.busy_poll_ms is not None:
        serve += ["--busy-poll-ms", str(args.busy_poll_ms)]
    return serve + shlex.split(args.serve_flags)


def _served(args: argparse.Namespace, window) -> int:
    from .served_bench import run_served_bench, served_table, write_served

    device = args.devices.split(",")[0]  # (one device: the runner's and the served engine's)
    result = run_served_bench(args.model, device, window, args.workloads.split(","), args.concurrency,
                              _serve_arguments(args, window))
    print(served_table(result))
    for path in write_served(result, args.out):
        print(f"wrote {path}")
    return 0


def _scaling(args: argparse.Namespace, window) -> int:
    from .scaling_bench import run_scaling_bench, scaling_table, write_scaling

    try:
        result = run_scaling_bench(args.model, args.devices.split(","), args.workloads.split(","), args.concurrency,
                                   _serve_arguments(args, window))
    except ValueError as err:
        return fail(str(err))
    print(scaling_table(result))
    for path in write_scaling(result, args.out):
        print(f"wrote {path}")
    return 0


def _overhead(args: argparse.Namespace, window) -> int:
    from .overhead import as_dict, overhead_table, run_overhead
    from .overhead_baselines import make_item

    serve = _serve_arguments(args, window)
    if args.item_grid:
        try:
            height, width = (int(x) for x in args.item_grid.lower().split("x"))
        except ValueError:
            return fail(f"--item-grid takes HxW in patches, e.g. 2x2; got {args.item_grid!r}")
        from vitserve.preprocess.in_force import preprocess_for

        item = make_item(None, (height, width), preprocess_for(args.model).patch_dim)
    else:
        item = make_item(args.image_side, None)
    result = run_overhead(args.model, args.devices, window, item, args.requests, args.concurrency, serve,
                          busy_poll_ms=args.busy_poll_ms)
    print(overhead_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "overhead.json"
    path.write_text(json.dumps(as_dict(result), indent=1))
    print(f"wrote {path}")
    return 0


async def _against_endpoint(args: argparse.Namespace, jobs) -> dict:
    from vitserve.client import AsyncClient

    async with AsyncClient(args.endpoint) as client:
        def encode(items, deadline_ms, priority):
            return client.encode(items, deadline_ms, priority)

        if args.rate:
            arrivals = poisson_arrivals(args.rate, args.duration)
            result = await open_loop(encode, jobs, arrivals, label=f"open {args.rate}/s")
        else:
            result = await closed_loop(encode, jobs, args.requests, args.concurrency, label=f"closed x{args.concurrency}")
    return result.row()


def add_arguments(bench: argparse.ArgumentParser) -> None:
    load = bench.add_argument_group("load through the engine")
    load.add_argument("--endpoint", help="send load to a running `vitserve serve` (closed loop, or open with --rate)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (with --endpoint)")
    load.add_argument("--concurrency", type=int, default=32, help="closed loop: requests outstanding")
    load.add_argument("--duration", type=float, default=20.0, help="open loop: seconds of arrivals")
    load.add_argument("--deadline-ms", type=float, default=200.0,
                      help="every request's deadline (mixed-slo's classes set their own)")
    load.add_argument("--compare-policies", action="store_true",
                      help="deadline-aware vs immediate vs max-delay flushing on the same Poisson arrivals, "
                           "interleaved on one embedded engine on --devices (--duration of arrivals per policy)")
    load.add_argument("--overhead", action="store_true",
                      help="single-image requests through `vitserve serve` on --devices and through an engine in this "
                           "process, against a raw ZeroMQ round trip and the runner alone, in one run (--requests, "
                           "--concurrency, --image-side)")
    load.add_argument("--served", action="store_true",
                      help="the runner alone (raw items, preprocessing on the device) against `vitserve serve` on the "
                           "first of --devices, taking turns on it, per workload: throughput and ratio, p50/p99, GPU "
                           "busy share, engine CPU per request (--concurrency outstanding)")
    load.add_argument("--scaling", action="store_true",
                      help="`vitserve serve` on the first of --devices against one on all of them, taking turns, per "
                           "workload: images/s of each and their ratio (ideal: the device count), p50/p99, busy share "
                           "per device (--concurrency outstanding per device); then a worker killed under load")
    load.add_argument("--serve-flags", default="", help="more flags for the `vitserve serve` that --served, "
                      "--scaling and --overhead start, e.g. \"--output-windows 32\"")
    load.add_argument("--busy-poll-ms", type=float, help="the engines' busy_poll_ms (`vitserve serve --busy-poll-ms`; "
                      "with --overhead, the embedded engine's too), to compare polling with sleeping (default: "
                      "the engine's)")
    load.add_argument("--image-side", type=int, default=448, help="with --overhead: the square image's side")
    load.add_argument("--item-grid", help="with --overhead: send an already-processed image of this patch grid "
                                          "instead, e.g. 2x2 (isolates the engine's costs from the model's)")
    load.add_argument("--devices", default="cuda:0",
                      help="with --compare-policies, --overhead, --served or --scaling: comma-separated torch "
                           "devices (one may repeat: two workers on one GPU)")
    load.add_argument("--load", type=float, default=0.8, help="with --compare-policies: fraction of saturation")
    load.add_argument("--rounds", type=int, default=4,
                      help="with --compare-policies: arrival sequences, each played once per policy (--duration "
                           "is split among them)")
    load.add_argument("--max-delay-ms", type=float, default=5.0, help="the max_delay policy's wait")
    load.add_argument("--output-windows", type=int, default=16,
                      help="the served engine's shared-memory output per worker, in windows of the largest budget")


def fail(message: str) -> int:
    print(f"vitserve bench: {message}", file=sys.stderr)
    return 2
