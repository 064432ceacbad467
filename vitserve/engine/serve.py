"""`vitserve serve`: an Engine behind the ZeroMQ frontend until SIGINT or SIGTERM.

The endpoint is bound first, so one that another engine holds (or a busy port) fails in
milliseconds with EndpointError instead of after minutes of model load and graph capture; while
the engine starts, health answers "starting" and hellos wait for their welcome until it is ready
(a signal then stops the start).
On the signal the engine drains: new requests get `shutting_down`, those admitted finish (up to
drain_timeout_s) and their replies go out while the frontend still runs; results not yet released
stay readable (up to RELEASE_GRACE_S, while their clients map them); then everything stops,
the slabs are removed, and so is the socket file (also when the engine failed to start)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from vitserve.gc_pauses import freeze_start_up_objects
from vitserve.ipc.auth import ServerKeys
from vitserve.ipc.endpoints import DEFAULT_SOCKET_MODE, EndpointError
from vitserve.launch import EarlyWorkers
from vitserve.log_lines import event
from vitserve.preprocess.in_force import describe, overridden

from .config import EngineConfig
from .engine import Engine
from .frontend import Frontend
from .http_endpoint import HttpEndpoint

log = logging.getLogger(__name__)

RELEASE_GRACE_S = 5.0  # after the drain, how long results not yet released stay readable
RELEASE_POLL_S = 0.02


async def serve(config: EngineConfig, endpoint: str, socket_mode: int = DEFAULT_SOCKET_MODE,
                keys: ServerKeys | None = None, allow_insecure_tcp: bool = False,
                early: EarlyWorkers | None = None, http: tuple[str, int] | None = None,
                freeze_gc: bool = False) -> int:
    """The process's exit code: 0 after a signal and a drain, 1 when the engine or the frontend
    stopped by itself (a supervisor should start it again). `early`: worker processes started
    before (launch.py), for the engine to adopt. `http`: (host, port) of /metrics, /livez and /readyz.
    `freeze_gc`: the process is vitserve's own (`vitserve serve`): once ready, what it made while
    starting leaves the garbage collector's passes (gc_pauses.py); never in someone else's process."""
    web = None
    try:
        frontend = Frontend(endpoint, config, socket_mode, keys, allow_insecure_tcp)
        try:
            web = HttpEndpoint(*http) if http is not None else None
        except OSError as err:
            frontend.close()
            raise EndpointError(f"--http-port: cannot listen on {http[0]}:{http[1]} ({err.strerror or err}): "
                                f"choose another port") from None
    except BaseException:
        if early is not None:
            early.discard()
        raise
    frontend.watch()  # floods and silent peers are shed while the engine starts, too
    try:
        return await _serve(config, frontend, early, web, freeze_gc)
    finally:
        if web is not None:
            web.close()
        frontend.close()


async def _serve(config: EngineConfig, frontend: Frontend, early: EarlyWorkers | None, web: HttpEndpoint | None,
                 freeze_gc: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for name in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(name, stop.set)
    began = time.perf_counter()
    engine = Engine(config, early)
    # The endpoint answers while the engine starts: health says "starting", and hellos are answered
    # once it is ready (a client started alongside the server just waits for its welcome).
    task = loop.create_task(frontend.serve(engine))
    if web is not None:  # liveness at once, readiness once the engine is ready
        web.start(loop, lambda: engine.snapshot(frontend.stats() if frontend.engine is not None else None,
                                                frontend.error_codes))
        event(f"metrics on {web.url}/metrics, liveness on /livez, readiness on /readyz", url=web.url)
    signalled = loop.create_task(stop.wait())
    # At once, on stderr (stdout's first line stays the "ready" line that scripts wait for).
    event(f"starting on {frontend.endpoint}: {config.model} on {', '.join(config.devices)}",
          endpoint=frontend.endpoint, model=config.model, devices=list(config.devices))
    flags = [f"--{name.replace('_', '-')}" for name in overridden(config.preprocess, config.model)]  # (serve's flags)
    event(describe(config.preprocess, config.model, flags), overridden=flags)
    starting = loop.create_task(engine.start())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during the start: stop starting (start() cleans up after itself)
        starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    if starting.cancelled() or starting.exception() is not None:
        for waiter in (task, signalled):
            waiter.cancel()
        await asyncio.gather(task, signalled, return_exceptions=True)
        if starting.cancelled():
            return 0
        raise starting.exception()  # a failed start raises, as it always has
    try:
        return await _serve_started(engine, frontend, task, signalled, began, freeze_gc)
    finally:
        await engine.close()


async def _serve_started(engine: Engine, frontend: Frontend, task: asyncio.Task, signalled: asyncio.Task,
                         began: float, freeze_gc: bool) -> int:
    config, ready = engine.config, engine.ready
    if freeze_gc:
        freeze_start_up_objects()
    frontend.engine_started()
    print(f"vitserve ready on {frontend.endpoint}: model {config.model} on {', '.join(config.devices)} "
          f"({ready.dtype}), budgets {list(engine.capacities.budgets)}, worker ready {ready.ready_s:.1f} s after Begin, "
          f"started in {time.perf_counter() - began:.1f} s", flush=True)
    failed = asyncio.get_running_loop().create_task(engine.stopped.wait())
    await asyncio.wait({task, signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    if not signalled.done():  # not asked to stop: serving cannot go on
        problem = engine.failure if failed.done() else (task.exception() if not task.cancelled() else None)
        log.critical("vitserve: the engine stopped serving (%r): exiting with code 1", problem)
        for waiter in (task, signalled, failed):
            waiter.cancel()
        await asyncio.gather(task, signalled, failed, return_exceptions=True)
        return 1
    failed.cancel()
    print("vitserve: draining", flush=True)
    await engine.drain()
    await asyncio.sleep(0)  # the replies of requests failed at the drain's end are sent from callbacks
    # A local client reads a result from shared memory, asking the slab channel for the slab first:
    # results delivered at the drain's end stay readable until their clients release them, a while
    waited = 0.0
    while engine.stats()["requests_open"] and waited < RELEASE_GRACE_S:
        await asyncio.sleep(RELEASE_POLL_S)
        waited += RELEASE_POLL_S
    task.cancel()
    await asyncio.gather(task, failed, return_exceptions=True)
    return 0


def run(config: EngineConfig, endpoint: str, socket_mode: int = DEFAULT_SOCKET_MODE,
        keys: ServerKeys | None = None, allow_insecure_tcp: bool = False, early: EarlyWorkers | None = None,
        http: tuple[str, int] | None = None, freeze_gc: bool = False) -> int:
    """Serve until a signal (exit code 0) or a failure (1); EndpointError or AuthError (before the
    engine starts) when an endpoint cannot be had or may not be served so. `freeze_gc`: as `serve`'s."""
    serving = serve(config, endpoint, socket_mode, keys, allow_insecure_tcp, early, http, freeze_gc)
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but a missing one should not stop the server
        return asyncio.run(serving)
    return uvloop.run(serving)
