"""`vitserve demo`: the product in one command. It starts `vitserve serve` on a private endpoint, sends
the built-in images and video through a client as concurrent requests (the engine packs them into
windows), prints per item its grid, its rows and where they lie in shared memory, then the engine's
windows and times, and stops the server."""

from __future__ import annotations

import argparse
import asyncio
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 600.0


def run_demo(args: argparse.Namespace) -> int:
    from vitserve.cli import demo_inputs

    folder = Path(tempfile.mkdtemp(prefix="vitserve-demo-"))
    endpoint = f"ipc://{folder}/demo.sock"
    command = [sys.executable, "-m", "vitserve.cli", "serve", "--model", args.model, "--devices", args.devices,
               "--endpoint", endpoint]
    print(f"starting: {' '.join(command[1:])}", flush=True)
    began = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # (its stderr: the start's progress)
    try:
        started = select.select([server.stdout], [], [], START_TIMEOUT_S)[0]  # (a start may capture graphs: minutes)
        ready = server.stdout.readline() if started else ""
        if "ready" not in ready:
            code = server.wait(30) if started else None  # (its stdout closed: it is exiting)
            why = f"exited with code {code}" if code is not None else f"was not ready within {START_TIMEOUT_S:.0f} s"
            print(f"vitserve demo: the server {why}; its messages are above", file=sys.stderr)
            return 1
        print(f"{ready.strip()} [{time.perf_counter() - began:.1f} s after it was started]", flush=True)
        asyncio.run(_encode(endpoint, demo_inputs()))
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(folder, ignore_errors=True)


async def _encode(endpoint: str, items: list) -> None:
    from vitserve import AsyncClient

    async with AsyncClient(endpoint, name="vitserve-demo") as client:
        model = client.model
        print(f"\nmodel {model.model_type} ({model.source}), {model.dtype}, rows of {model.out_hidden} "
              f"+ {model.num_deepstack} deepstack, budgets {list(model.budgets)}")

        async def one(array):
            began = time.perf_counter()
            result = await client.encode([array])
            return result, (time.perf_counter() - began) * 1e3

        print(f"{len(items)} requests at once, one item each: the engine packs them into windows\n")
        done = await asyncio.gather(*(one(array) for _, array in items))
        print(f"{'item':<26} {'input':>14} {'grid t x h x w':>15} {'rows x width':>14} {'ms':>7}  where the rows are")
        for (name, array), (result, ms) in zip(items, done):
            item, ref = result.items[0], result.refs[0]
            rows, width = item.embeddings.shape
            where = f"/dev/shm/{ref.slab} at byte {ref.offset}" if ref.slab else "in the reply (inline)"
            print(f"{name:<26} {'x'.join(map(str, array.shape[:-1])):>14} {'x'.join(map(str, item.grid)):>15} "
                  f"{f'{rows} x {width}':>14} {ms:7.1f}  {where}")
        stats = await client.stats()
        for result, _ in done:
            result.release()
        windows = stats["windows_sent"]
        print(f"\n{int(stats['items_sent'])} items in {int(windows)} windows "
              f"({stats['items_sent'] / max(windows, 1):.1f} per window), the worker busy "
              f"{stats['worker_ms']:.0f} ms; read the rows with `client.encode` / `client.view` "
              f"(zero-copy on this host), see docs/usage.md")
