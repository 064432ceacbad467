"""Where the latency of one request goes, hop by hop, through `vitserve serve` over ipc://: what
the client, the engine and the worker add to the model's own work.

Requests of one raw uint8 image go strictly one at a time, so one request's hops never overlap
the next one's. This process (the client), the engine (`serve_traced`) and its worker
(`traced_worker_main`) note (label, time.monotonic()) at the entry (">") and exit ("<") of methods
wrapped at run time, with no change to the product code; CLOCK_MONOTONIC is one clock for the whole
host, so each request's events are matched by time. Prints each hop's p50 and p90 in ms:

    python3 tools/trace_hops.py --model random:qwen3-vl-8b --device cuda:0 --image-side 448 --requests 300
    .venv/bin/python tools/trace_hops.py --model random:tiny --device cpu --image-side 64 --requests 100

Flags this tool does not know go to `vitserve serve` (e.g. --policy immediate).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
GAP_MS = 2.0  # between requests by default: the last one's stragglers (its release) are over before the next starts

# One request's events in the order they happen, each with the hop that ends at it (hops are
# contiguous: a request's hops add up to its total), a line for each process in turn. A message's
# hop starts at the entry of the call that hands it to ZeroMQ, never at an exit: the receiver may
# run before the sender's call returns (and is seen to, on a host of few cores).
CHAIN = [
    ("encode>", ""), ("send>", "client prep"),  # pixels into the input arena, the Encode header made
    ("receive>", "to frontend"), ("submit>", "admission"), ("submit<", "submit"),  # admission: decode, limits, admit
    ("poll>", "dispatch wake"), ("send_window>", "poll"), ("worker_send>", "send window"),
    ("received<", "to worker"), ("start>", "worker decode"),  # to worker: the link, the worker's wake-up
    ("on_device>", "start head"), ("on_device<", "on_device"),
    ("preprocess>", "to preprocess"), ("preprocess<", "preprocess"),
    ("runner>", "to runner"), ("runner<", "runner encode"), ("start<", "start tail"),  # to runner: cat, slot
    ("finished", "device + poll"), ("reply>", "to reply"), ("reply<", "reply"),  # device: found done by a poll
    ("readable>", "to engine"), ("complete>", "engine receive"),  # to engine: the link, the loop's wake-up
    ("finish>", "complete"), ("result_send>", "finish"),  # complete: to a done callback
    ("dispatch>", "to client"), ("encode<", "client wake"),
]

EVENTS: list[tuple[str, float]] = []  # this process's (label, time.monotonic())


def record(label: str) -> None:
    EVENTS.append((label, time.monotonic()))


def dump(folder: str, role: str) -> None:
    with open(os.path.join(folder, f"{role}-{os.getpid()}.json"), "w") as file:
        json.dump(EVENTS, file)


def timed(function, label: str, enter: bool = True, exit: bool = True):
    @functools.wraps(function)
    def traced(*args, **kwargs):
        if enter:
            record(label + ">")
        try:
            return function(*args, **kwargs)
        finally:
            if exit:
                record(label + "<")
    return traced


def patch(cls: type, name: str, label: str, enter: bool = True, exit: bool = True) -> None:
    """Wrap the method on the class that defines it (mixins: the class used may only inherit it);
    methods are looked up at call time, so existing objects take the wrapper too."""
    owner = next(c for c in cls.__mro__ if name in vars(c))
    setattr(owner, name, timed(vars(owner)[name], label, enter, exit))


# -- the engine and the worker ---------------------------------------------------------------
def serve_traced(folder: str, argv: list[str]) -> None:
    """`vitserve serve argv`, traced; its events (and, at its end, its worker's) land in `folder`."""
    from vitserve import cli, launch
    from vitserve.engine import worker_handle
    from vitserve.engine.engine import Engine
    from vitserve.engine.frontend import Frontend
    from vitserve.ipc.link import EngineLink

    patch(Frontend, "_checked", "receive", exit=False)  # any client message (either link), releases too
    patch(Engine, "submit", "submit")
    patch(Engine, "_poll", "poll", exit=False)
    patch(Engine, "_send", "send_window", exit=False)
    patch(worker_handle.WorkerHandle, "send_now", "worker_send", exit=False)  # in _send: the RunWindow
    patch(EngineLink, "_on_readable", "readable", exit=False)  # the loop found a worker's bytes
    patch(Engine, "_complete", "complete", exit=False)  # the WindowDone is received and decoded
    patch(Frontend, "_finish", "finish", exit=False)  # bound when the request is queued: after this patch
    patch(Frontend, "_send", "result_send", exit=False)  # in _finish: the Result
    # Both spawn their process's entry point by its name at call time (serve's early GPU workers:
    # launch.run_worker; the engine's, standby ones included: worker_handle.worker_main); a partial
    # of a module-level function pickles by reference, and spawn gives the child our sys.path,
    # which holds TOOLS_DIR.
    traced = functools.partial(traced_worker_main, folder)
    launch.run_worker = worker_handle.worker_main = traced
    try:
        code = cli.main(["serve", *argv])
    finally:
        dump(folder, "engine")
    sys.exit(code)


def traced_worker_main(folder: str, spec) -> None:
    from vitserve.workers import worker
    from vitserve.ipc.worker_link import WorkerLink
    from vitserve.workers.process import worker_main
    from vitserve.workers.runner import ModelRunner
    from vitserve.workers.running import Running
    from vitserve.workers.worker_inputs import WorkerInputs

    patch(WorkerLink, "receive", "received", enter=False)  # a message read (the window's, among others)
    patch(worker.Worker, "start", "start")
    patch(WorkerInputs, "on_device", "on_device")
    worker.preprocess_batch = timed(worker.preprocess_batch, "preprocess")  # imported by name into worker.py
    patch(ModelRunner, "encode", "runner")
    patch(Running, "reply", "reply")
    finished = Running.finished

    def first_finished(self) -> bool:  # polled until True: only the first True is the event
        done = finished(self)
        if done and not getattr(self, "_traced_finished", False):
            self._traced_finished = True
            record("finished")
        return done

    Running.finished = first_finished
    try:
        worker_main(spec)  # returns on the engine's Shutdown (a device fault exits without the dump)
    finally:
        dump(folder, "worker")


# -- the client ------------------------------------------------------------------------------
def start_server(endpoint: str, folder: str, args: argparse.Namespace, extra: list[str]) -> subprocess.Popen:
    """`vitserve serve` traced, once ready (as vitserve.bench.server_process.start_server does it);
    `python -c`, not this script, so that spawn does not import the script again in the worker."""
    code = f"import sys; sys.path.insert(0, {TOOLS_DIR!r}); import trace_hops; " \
           f"trace_hops.serve_traced(sys.argv[1], sys.argv[2:])"
    command = [sys.executable, "-c", code, folder, "--model", args.model, "--devices", args.device,
               "--endpoint", endpoint, *extra]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:
            if line.startswith("vitserve ready"):
                return server
        raise RuntimeError("`vitserve serve` did not become ready; see its log above")
    except BaseException:  # not ready, or interrupted: nothing may be left running
        server.kill()
        server.wait()
        raise


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()  # SIGTERM: the engine drains and stops its worker; both write their events
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def run_client(endpoint: str, image, warmup: int, requests: int, gap_s: float, direct: bool) -> None:
    from vitserve.bench.load import until_settled
    from vitserve.client import AsyncClient

    async with AsyncClient(endpoint, direct=direct) as client:
        await until_settled(client.stats)
        for _ in range(warmup):  # untraced: the first windows, slab mappings
            (await client.encode([image])).release()
            await asyncio.sleep(gap_s)
        # This instance's: encode's send (and releases, which go out in the pause between requests).
        client._transport.send_now = timed(client._transport.send_now, "send", exit=False)
        patch(AsyncClient, "_dispatch", "dispatch", exit=False)  # a reply arrived (called from _receive)
        for _ in range(requests):
            record("encode>")  # around the await: the same task steps as encode's own start and end
            result = await client.encode([image])
            record("encode<")
            result.release()
            await asyncio.sleep(gap_s)


# -- the analysis ----------------------------------------------------------------------------
# Entered in the very call that leads to the next event, but also at other times (a Release; a poll
# that sent nothing, e.g. a scheduler holding a window on purpose): the last one before the next event.
LAST_BEFORE_NEXT = {"receive>", "poll>", "readable>"}


def match(times: dict[str, list[float]], began: float, ended: float) -> list[float] | str:
    """The request's time at each event of CHAIN: the first at or after the event before, within
    the request (or LAST_BEFORE_NEXT); or the first event missing."""
    matched = [began]
    for label, _ in CHAIN[1:-1]:
        found = times.get(label, [])
        index = bisect.bisect_left(found, matched[-1])
        if index == len(found) or found[index] > ended:
            return label
        previous = CHAIN[len(matched) - 1][0]
        matched.append(found[index])
        if previous in LAST_BEFORE_NEXT:
            earlier = times[previous]
            matched[-2] = earlier[bisect.bisect_right(earlier, matched[-1]) - 1]
    return matched + [ended]


def hop_rows(folder: str, skip: int) -> tuple[list[dict[str, float]], Counter]:
    """Each traced request's hops in ms (after `skip`), and the events missing in those dropped."""
    times: dict[str, list[float]] = {}
    for name in os.listdir(folder):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as file:
                for label, at in json.load(file):
                    times.setdefault(label, []).append(at)
    for found in times.values():
        found.sort()
    requests = list(zip(times.get("encode>", []), times.get("encode<", [])))[skip:]
    rows, missing = [], Counter()
    for began, ended in requests:
        matched = match(times, began, ended)
        if isinstance(matched, str):
            missing[matched] += 1
            continue
        row = {hop: (matched[i] - matched[i - 1]) * 1e3 for i, (_, hop) in enumerate(CHAIN) if hop}
        rows.append(row | {"total": (ended - began) * 1e3})
    return rows, missing


def table(rows: list[dict[str, float]], dropped: str) -> str:
    import numpy as np

    spans = [(hop, f"{CHAIN[i - 1][0]} -> {label}") for i, (label, hop) in enumerate(CHAIN) if hop]
    spans.append(("total", f"{CHAIN[0][0]} -> {CHAIN[-1][0]}"))
    lines = [f"{len(rows)} sequential requests ({dropped}), ms",
             f"{'hop':<16} {'p50':>8} {'p90':>8}   from -> to"]
    p50s = {}
    for name, span in spans:
        p50s[name], p90 = np.percentile([row[name] for row in rows], [50, 90])
        lines.append(f"{name:<16} {p50s[name]:8.3f} {p90:8.3f}   {span}")
    total = p50s.pop("total")
    lines.append(f"sum of the hops' p50s {sum(p50s.values()):.3f} ms; median total {total:.3f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(epilog="flags not listed here go to `vitserve serve`")
    parser.add_argument("--model", default="random:qwen3-vl-8b")
    parser.add_argument("--device", default="cuda:0", help="the serve's --devices (one worker)")
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--requests", type=int, default=300, help="traced requests")
    parser.add_argument("--warmup", type=int, default=50, help="untraced requests first")
    parser.add_argument("--gap-ms", type=float, default=GAP_MS, help="pause between requests (0: each request "
                        "right after the last one's reply, as `vitserve bench --overhead` sends them)")
    parser.add_argument("--skip", type=int, default=30, help="traced requests left out of the table")
    parser.add_argument("--out", help="write each request's hops (ms) to this JSON file")
    parser.add_argument("--zeromq", action="store_true", help="the client talks ZeroMQ, not the direct link")
    args, extra = parser.parse_known_args()
    if args.requests <= args.skip:
        parser.error("--requests must be more than --skip")
    from vitserve.bench.overhead_baselines import make_item
    from vitserve.bench.server_process import run_loop

    image = make_item(args.image_side, None)
    with tempfile.TemporaryDirectory(prefix="vitserve-trace-") as folder:  # the endpoint and the events
        endpoint = f"ipc://{folder}/engine"
        server = start_server(endpoint, folder, args, extra)
        try:
            run_loop(run_client(endpoint, image, args.warmup, args.requests, args.gap_ms / 1e3,
                                not args.zeromq))
            dump(folder, "client")
        finally:
            stop_server(server)
        rows, missing = hop_rows(folder, args.skip)
    dropped = f"{sum(missing.values())} dropped for a missing event" + \
        "".join(f", {count} {label}" for label, count in missing.most_common())
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)
    if not rows:
        raise SystemExit(f"no request had all its events ({dropped})")
    print(table(rows, dropped))


if __name__ == "__main__":
    main()
