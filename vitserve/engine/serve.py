"""`vitserve serve`: an Engine behind the ZeroMQ frontend until SIGINT or SIGTERM.

On the signal the engine drains: new requests get `shutting_down`, those admitted finish (up to
drain_timeout_s) and their replies go out while the frontend still runs; then everything stops
and the slabs are removed."""

from __future__ import annotations

import asyncio
import signal
import time

from .config import EngineConfig
from .engine import Engine
from .frontend import Frontend


async def serve(config: EngineConfig, endpoint: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for name in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(name, stop.set)
    began = time.perf_counter()
    async with Engine(config) as engine:
        frontend = Frontend(engine, endpoint)
        ready = engine.ready
        print(f"vitserve ready on {endpoint}: model {config.model} on {', '.join(config.devices)} ({ready.dtype}), "
              f"budgets {list(engine.capacities.budgets)}, capture {ready.capture_s:.1f} s, "
              f"started in {time.perf_counter() - began:.1f} s", flush=True)
        task = loop.create_task(frontend.serve())
        await stop.wait()
        print("vitserve: draining", flush=True)
        await engine.drain()
        await asyncio.sleep(0)  # the replies of requests failed at the drain's end are sent from callbacks
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(config: EngineConfig, endpoint: str) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but a missing one should not stop the server
        asyncio.run(serve(config, endpoint))
    else:
        uvloop.run(serve(config, endpoint))
