"""A `vitserve serve` process for the benches (overhead.py, served_bench.py), and the event loop
they drive their clients with."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from typing import Sequence

SERVER_START_TIMEOUT_S = 600.0


def start_server(endpoint: str, model: str, devices: str, extra: list[str],
                 launcher: Sequence[str] = (sys.executable, "-m", "vitserve.cli")) -> subprocess.Popen:
    """`vitserve serve` once it is ready. `launcher`: the command that takes the CLI's arguments (a
    tool may run the CLI with its own wrapping, as tools/burst_stalls.py does)."""
    command = [*launcher, "serve", "--model", model, "--devices", devices, "--endpoint", endpoint, *extra]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    for line in server.stdout:
        if line.startswith("vitserve ready"):
            return server
        sys.stderr.write(line)  # what it said before it was ready (or why it never was) stays in the log
        if time.monotonic() > deadline:
            break
    server.kill()
    raise RuntimeError(f"`vitserve serve` did not become ready (exit code {server.wait()}); see its log above")


def stop_server(server: subprocess.Popen, folder: str) -> None:
    """Stop a server that `start_server` started, and remove the folder of its endpoint."""
    server.terminate()
    server.wait(60)
    shutil.rmtree(folder, ignore_errors=True)


def run_loop(coroutine):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
