"""`vitserve serve --http-port`: Prometheus metrics and health over HTTP, beside the ZeroMQ endpoint.

    /metrics   the engine's counters and gauges (engine/metrics.py), Prometheus' text format
    /livez     200 while the process and its event loop answer; 503 when the loop is stuck
    /readyz    200 while the engine admits requests with a worker up; 503 with the reason otherwise

A small threaded HTTP server answers; each probe asks the engine's event loop for one snapshot
(stats and health, built in one loop turn) and waits at most PROBE_TIMEOUT_S for it. One probe runs
at a time, and a loop that has not taken the last probe's snapshot is not asked again: probes never
pile up on a stuck loop, they get 503 at once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from vitserve.ipc.messages import Health

from .run_counts import RunTotals

PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    """The engine at one moment, taken on its loop: what every probe reads."""

    stats: dict[str, float]  # the frontend's and the engine's (what a stats query gives)
    health: Health
    latencies: dict[str, tuple[tuple[float, ...], list[int], float]]  # engine/latencies.py: bounds, counts, sum
    error_codes: dict[str, int]  # errors answered, by code
    runs: RunTotals  # engine/run_counts.py


class HttpEndpoint:
    def __init__(self, host: str, port: int):
        """Bind now (OSError when the port is taken: before anything slow starts); `start` answers."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshot: Callable[[], Snapshot] | None = None
        self._probe = threading.Lock()  # one probe at a time
        self._asked: Future | None = None  # the last snapshot asked of the loop: never two waiting there
        self._server = make_server(host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="vitserve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Snapshot]) -> None:
        """Answer probes; `snapshot` runs on `loop` (the engine's): stats and health of one moment."""
        self._loop, self._snapshot = loop, snapshot
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path not in ("/metrics", "/livez", "/readyz"):
            return _answer(start_response, "404 Not Found", "the paths are /metrics, /livez and /readyz\n")
        if not self._probe.acquire(timeout=PROBE_TIMEOUT_S):
            return _answer(start_response, "503 Service Unavailable", "another probe is waiting for the engine\n")
        try:
            if self._asked is not None and not self._asked.done():  # the loop has not taken the last one yet
                return _answer(start_response, "503 Service Unavailable",
                               "the engine's event loop has not answered the last probe\n")
            self._asked = asyncio.run_coroutine_threadsafe(self._take(), self._loop)
            try:
                taken = self._asked.result(PROBE_TIMEOUT_S)
            except (FutureTimeout, RuntimeError):  # a stuck loop, or one that is closing
                return _answer(start_response, "503 Service Unavailable",
                               f"the engine's event loop did not answer within {PROBE_TIMEOUT_S:g} s\n")
            except Exception as err:  # the snapshot failed (an engine stopping): a reason, not a traceback
                return _answer(start_response, "503 Service Unavailable", f"the engine could not say: {err!r}\n")
        finally:
            self._probe.release()
        if path == "/livez":
            return _answer(start_response, "200 OK", "alive\n")
        health = taken.health
        if path == "/readyz":
            if health.ready:
                return _answer(start_response, "200 OK", f"ready: {health.workers_ready} of {health.workers} workers up\n")
            return _answer(start_response, "503 Service Unavailable", f"not ready: {health.detail or 'no worker is up'}\n")
        from prometheus_client import CollectorRegistry, generate_latest  # (only a served engine with --http-port)
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        registry = CollectorRegistry()
        registry.register(_Collected(taken))
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [generate_latest(registry)]

    async def _take(self) -> Snapshot:
        return self._snapshot()


class _Collected:
    """One snapshot, as a collector registers it."""

    def __init__(self, taken: Snapshot):
        self._taken = taken

    def collect(self):
        from .metrics import metric_families

        return metric_families(self._taken)


def _answer(start_response, status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]


class _ThreadingServer(WSGIServer):
    """A thread per request (a probe that waits must not hold up the next connection's accept)."""

    daemon_threads = True

    def process_request(self, request, client_address):
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no line per probe on stderr
        pass
