"""`vitserve soak`: its flags, and the soak's configuration from them (the soak itself: run.py)."""

from __future__ import annotations

import argparse
import sys

from vitserve.choices import DEFAULT_MODEL


def add_soak_parser(commands) -> None:
    from vitserve.bench.workloads import WORKLOADS
    from vitserve.choices import SOAK_FAULTS as FAULTS
    from vitserve.cli import add_budget_arguments

    soak = commands.add_parser("soak", help="mixed load with faults against an engine; exits 1 on any violation")
    soak.add_argument("--endpoint", help="a running engine (default: start one with --model and --devices)")
    soak.add_argument("--model", default=DEFAULT_MODEL, help=f"own engine's model (default {DEFAULT_MODEL})")
    soak.add_argument("--devices", default="cpu", help="own engine's devices, e.g. cuda:0")
    soak.add_argument("--max-queued-items", type=int, default=256, help="own engine's queue bound (overload hits it)")
    add_budget_arguments(soak)
    soak.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    soak.add_argument("--rate", type=float, default=20.0, help="requests per second (Poisson)")
    soak.add_argument("--workload", default="small-mix", choices=sorted(WORKLOADS), help="the requests' shapes")
    soak.add_argument("--distinct", type=int, default=32, help="distinct inputs, repeated to compare results")
    soak.add_argument("--clients", type=int, default=4, help="client connections sharing the load")
    soak.add_argument("--deadline-ms", type=float, help="deadline of every request (default: none)")
    soak.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, in turn: {', '.join(FAULTS)}")
    soak.add_argument("--fault-interval", type=float, default=10.0, help="seconds between faults")
    soak.add_argument("--overload-burst", type=int, default=400, help="requests sent at once by the overload fault")
    soak.add_argument("--max-rss-growth-mb", type=float, default=256.0,
                      help="the engine's resident memory may grow this much over the run; more is a violation")
    soak.add_argument("--max-gpu-growth-mb", type=float, default=512.0,
                      help="device memory may grow this much over the run; more is a violation")
    soak.add_argument("--seed", type=int, default=0, help="of the inputs, arrivals and faults: a run repeats")
    soak.set_defaults(handler=run_soak)


def run_soak(args: argparse.Namespace) -> int:
    import asyncio

    from vitserve.soak import SoakConfig, soak
    from vitserve.soak.resources import Growth

    serve_flags = ("--model", args.model, "--devices", args.devices, "--max-queued-items", str(args.max_queued_items),
                   "--min-budget", str(args.min_budget), "--max-budget", str(args.max_budget),
                   *(("--extra-budgets", args.extra_budgets) if args.extra_budgets else ()),
                   *(("--budgets", args.budgets) if args.budgets else ()))
    try:
        config = SoakConfig(endpoint=args.endpoint, serve_flags=serve_flags, duration_s=args.duration, rate=args.rate,
                            workload=args.workload, distinct=args.distinct, clients=args.clients,
                            deadline_ms=args.deadline_ms, faults=tuple(f for f in args.faults.split(",") if f),
                            fault_interval_s=args.fault_interval, overload_burst=args.overload_burst,
                            growth=Growth(args.max_rss_growth_mb, args.max_gpu_growth_mb), seed=args.seed)
    except ValueError as err:
        print(f"vitserve soak: {err}", file=sys.stderr)
        return 2
    return asyncio.run(soak(config))
