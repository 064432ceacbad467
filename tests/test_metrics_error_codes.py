"""`vitserve serve --http-port`: every error code the server answers is counted once by its code.

Against a live `vitserve serve`, a known mix of requests provokes each server-side error code a known
number of times: results, invalid_input, too_large, protocol, overloaded, cancelled,
deadline_exceeded, worker_failed (a killed worker) and shutting_down (a request during the drain
after SIGTERM). Then /metrics, parsed with prometheus-client's text parser, must say exactly that:
vitserve_request_errors_total{code=...} for each code, vitserve_errors_total their sum,
vitserve_requests_total and vitserve_results_total what was sent and answered, and the histograms'
counts what ran (a failed request is no end-to-end observation, a window that never came back no
window_run one).

Nothing here depends on timing: whatever must stay queued or in flight does so behind a worker
stopped with SIGSTOP (its heartbeat is made slow and the window watchdog is off, so the engine
never takes it for hung or stuck), and the test waits for states (stats, replies, metrics), with
generous bounds, never for durations. (`unavailable` is the client's own code: never answered by
the server, it is not counted here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pytest
from hostile_helpers import Peer, barrier, encode_message, one_error, reply_to
from served import served
from test_http_endpoint import get, http_url, scrape

from vitserve import AsyncClient, Client
from vitserve.engine import EngineError
from vitserve.ipc.messages import PROTOCOL_VERSION, Hello, Release, Result

# A stopped worker must stay "alive" for the engine: three silent heartbeats of 100 s are far past
# the test, and no window watchdog (0) kills a window that does not come back.
FLAGS = ("--min-budget", "64", "--max-budget", "512", "--max-item-tokens", "4096", "--http-port", "0",
         "--worker-heartbeat-s", "100", "--window-timeout-s", "0")
WAIT_S = 60  # the bound of every wait for a state: far past what any step takes on a loaded machine
BIG = 512  # 1024 patch tokens, past --max-budget: a window of its own, which leaves at once


def image(side: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3)).astype(dtype)


def refused(code: str, call, *args, **kwargs) -> EngineError:
    """The EngineError that `call` raises, which must have `code`."""
    with pytest.raises(EngineError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value
    return caught.value


async def refused_async(code: str, awaitable) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(awaitable, WAIT_S)
    assert caught.value.code == code, caught.value
    return caught.value


async def until_stats(client: AsyncClient, condition, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while not condition(stats := await client.stats()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        await asyncio.sleep(0.02)
    return stats


def counted(url: str, errors: int) -> dict[str, float]:
    """The metrics once `errors` errors are counted: an error is counted when its reply goes out,
    from a callback a moment after the engine failed the request (a cancel, a killed worker)."""
    deadline = time.monotonic() + WAIT_S
    while (metrics := scrape(url))["vitserve_errors_total"] < errors:
        assert time.monotonic() < deadline, f"{errors} errors were never counted: {metrics}"
        time.sleep(0.05)
    return metrics


def by_code(metrics: dict[str, float]) -> dict[str, float]:
    prefix = "vitserve_request_errors_total{code="
    return {name[len(prefix):-1]: value for name, value in metrics.items() if name.startswith(prefix)}


def check_histograms(metrics: dict[str, float], results: int, windows_unfinished: int) -> None:
    """The histograms' counts follow what ran: one end-to-end observation per result (none for a
    request that failed), one queue wait per item sent to a worker, one window_run per window that
    came back; and each histogram's buckets are cumulative up to its count."""
    assert metrics["vitserve_end_to_end_seconds_count"] == results
    assert metrics["vitserve_queue_wait_seconds_count"] == metrics["vitserve_window_items_total"]
    assert metrics["vitserve_window_run_seconds_count"] == metrics["vitserve_windows_total"] - windows_unfinished
    for stage in ("end_to_end", "queue_wait", "window_run"):
        buckets = [value for name, value in metrics.items() if name.startswith(f"vitserve_{stage}_seconds_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == metrics[f"vitserve_{stage}_seconds_count"], stage


def test_each_error_code_is_counted_once_by_its_code(tmp_path):
    """invalid_input, too_large, protocol and overloaded with the worker running; then, with it
    stopped, deadline_exceeded, overloaded, cancelled, and worker_failed once it is killed: each
    counted by its code exactly as often as it was answered, and the totals add up."""
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    # No restart: a killed worker fails what it held and what is queued (worker_failed), and a request
    # sent afterwards finds no worker. At most 8 items queued (a client's share: 4) and 3 requests
    # open per connection: overloaded and too_large without a flood.
    with served(endpoint, *FLAGS, "--worker-restarts", "0", "--max-queued-items", "8",
                "--max-requests-per-client", "3") as process:
        url = http_url(process)
        requests = results = messages = 0  # messages: errors answered to a message that is no request
        errors: dict[str, int] = {}

        def expect(code: str, count: int = 1, are_requests: bool = True) -> None:
            nonlocal requests, messages
            errors[code] = errors.get(code, 0) + count
            requests, messages = (requests + count, messages) if are_requests else (requests, messages + count)

        # -- with the worker running ------------------------------------------------------------
        with Client(endpoint) as client:
            for seed in range(3):
                with client.encode([image(64, seed), image(96, seed)]):
                    results, requests = results + 1, requests + 1
            refused("too_large", client.encode, [image(2200)])  # past --max-item-tokens
            refused("too_large", client.encode, [image(32, i) for i in range(5)])  # past a client's share of 4 items
            expect("too_large", 2)
            refused("invalid_input", client.encode, [image(32)], priority=1000)  # outside --priorities
            refused("invalid_input", client.encode, [image(32)], deadline_ms=-1)
            expect("invalid_input", 2)
            with client.encode([image(48, 9)], keep=["kept"]):  # a kept item, then a lookup of it
                pass
            with client.lookup(["kept"]) as found:  # a lookup is a request, answered with outputs
                assert found.items[0].embeddings.shape[0] > 0
            client.forget(["kept"])
            results, requests = results + 2, requests + 2
            worker = client.health().worker_pids[0]

        peer = Peer(endpoint)  # raw frames: what a well-behaved client never sends
        try:
            pixels, floats = image(32), image(32, dtype=np.float32)
            peer.send(encode_message(10, floats), [floats])  # an image must be uint8
            one_error(barrier(peer), 10, "invalid_input", "uint8")
            expect("invalid_input")
            for request_id in (1, 2, 3):  # three results held (not released): the connection's limit
                peer.send(encode_message(request_id, pixels), [pixels])
                assert isinstance(reply_to(peer, request_id), Result)
                results, requests = results + 1, requests + 1
            peer.send(encode_message(4, pixels), [pixels])
            one_error(barrier(peer), 4, "overloaded", "max_requests=3")
            expect("overloaded")
            peer.send(encode_message(1, pixels), [pixels])  # an id this connection still holds
            one_error(barrier(peer), 1, "invalid_input", "already in use")
            expect("invalid_input")
            peer.send(Release([99]))  # a message, not a request: an error, no request
            one_error(barrier(peer), 99, "invalid_input", "holds nothing")
            expect("invalid_input", are_requests=False)
            peer.socket.send_multipart([b"\xc1"])  # not msgpack
            one_error(barrier(peer), None, "protocol", "undecodable")
            expect("protocol", are_requests=False)
            peer.send(Release([1, 2, 3]))
            assert barrier(peer) == []
        finally:
            peer.close()
        stranger = Peer(endpoint, hello=False)
        try:  # a hello in another protocol version: refused, a message and no request
            stranger.send(Hello(PROTOCOL_VERSION + 99))
            one_error([stranger.receive()[0]], None, "protocol", "not supported")
            expect("protocol", are_requests=False)
        finally:
            stranger.close()
        stranger = Peer(endpoint, hello=False)
        try:  # an encode before the hello: refused before it is a request
            stranger.send(encode_message(7, pixels), [pixels])
            one_error([stranger.receive()[0]], 7, "protocol", "hello first")
            expect("protocol", are_requests=False)
        finally:
            stranger.close()

        # -- with the worker stopped: what is sent stays in flight or queued until we act -------
        os.kill(worker, signal.SIGSTOP)
        try:
            for code, count in asyncio.run(stopped_worker_errors(endpoint, worker)).items():
                expect(code, count)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)  # (killed already, unless the test failed before)
        in_flight_lost = 2  # the two windows the killed worker held never came back

        metrics = counted(url, sum(errors.values()))
        assert by_code(metrics) == errors
        assert metrics["vitserve_errors_total"] == sum(errors.values())
        assert (metrics["vitserve_requests_total"], metrics["vitserve_results_total"]) == (requests, results)
        # every request ended once: with its result or with an error (the others were no requests)
        assert metrics["vitserve_requests_total"] == (metrics["vitserve_results_total"]
                                                      + metrics["vitserve_errors_total"] - messages)
        assert metrics["vitserve_window_items_total"] == 3 * 2 + 1 + 3 + 2  # results' items (the kept one too), and the two held ones
        check_histograms(metrics, results - 1, windows_unfinished=in_flight_lost)  # (the lookup ran no window)
        assert metrics["vitserve_late_results_total"] == 0 and metrics["vitserve_worker_restarts_total"] == 0
        assert metrics["vitserve_ready"] == 0 and metrics["vitserve_workers_ready"] == 0
        status, text = get(url + "/readyz")
        assert status == 503 and "no worker is up" in text, text


async def stopped_worker_errors(endpoint: str, worker: int) -> dict[str, int]:
    """With `worker` stopped: deadline_exceeded, overloaded (a client's share, a full queue),
    cancelled, then the worker killed: worker_failed for what it held and what was queued, and for
    a request after it. Every request sent here ends with an error: how many of each code."""
    clients = [AsyncClient(endpoint) for _ in range(6)]
    try:
        for client in clients:
            await client.connect()
        watch, first, second, hurried, share, other = clients
        # Two big windows fill the stopped worker's two in-flight places: later items stay queued.
        held_first = asyncio.ensure_future(first.encode([image(BIG, 1)]))
        held_second = asyncio.ensure_future(second.encode([image(BIG, 2)]))
        await until_stats(watch, lambda s: s["windows_in_flight"] == 2, "two windows in flight")

        # deadline_exceeded: one that cannot be met when it comes (no time left), and one doomed in
        # the queue (the scheduler fails it once it can no longer make it: scheduler/doomed.py)
        await refused_async("deadline_exceeded", hurried.encode([image(32)], deadline_ms=0))
        await refused_async("deadline_exceeded", hurried.encode([image(32)], deadline_ms=1000))

        # overloaded: a client past its share of the queue (4 of 8 items), then the queue full
        queued_share = asyncio.ensure_future(share.encode([image(32, i) for i in range(4)]))
        await until_stats(watch, lambda s: s["queued_items"] == 4, "4 items queued")
        await refused_async("overloaded", share.encode([image(32, 9)]))
        queued_other = asyncio.ensure_future(other.encode([image(32, i) for i in range(4)]))
        await until_stats(watch, lambda s: s["queued_items"] == 8, "8 items queued")
        error = await refused_async("overloaded", watch.encode([image(32, 9)]))
        assert "queue is full" in error.message, error.message

        # cancelled: a request in flight on the worker and a queued one, their tasks given up on (the
        # client sends a cancel; the engine fails the request with `cancelled` and answers that)
        for task in (held_first, queued_other):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await until_stats(watch, lambda s: s["queued_items"] == 4 and s["requests_open"] == 2,
                          "the cancelled requests ended")

        # worker_failed: the killed worker's window is queued again, but no worker is left (no
        # restarts), so it fails, as does the queued request; a request after them finds no worker.
        os.kill(worker, signal.SIGKILL)
        await refused_async("worker_failed", held_second)
        await refused_async("worker_failed", queued_share)
        await until_stats(watch, lambda s: s["workers_ready"] == 0 and s["requests_open"] == 0, "no worker left")
        error = await refused_async("worker_failed", watch.encode([image(32)]))
        assert "no worker" in error.message, error.message
        return {"deadline_exceeded": 2, "overloaded": 2, "cancelled": 2, "worker_failed": 3}
    finally:
        for client in clients:
            await client.close()


def test_requests_during_the_drain_are_counted_as_shutting_down(tmp_path):
    """After SIGTERM the engine drains: a request admitted before finishes, new ones get
    shutting_down, counted by their code while the drain waits (on a window of the stopped worker)."""
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, *FLAGS, "--drain-timeout-s", "300") as process:  # the drain waits for the worker
        url = http_url(process)
        with Client(endpoint) as client:
            for seed in range(2):
                with client.encode([image(64, seed)]):
                    pass
            worker = client.health().worker_pids[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            metrics = asyncio.run(drain_errors(endpoint, process, url, worker))
        finally:
            with contextlib.suppress(ProcessLookupError):  # (resumed already, unless the test failed before)
                os.kill(worker, signal.SIGCONT)
        assert by_code(metrics) == {"shutting_down": 2} and metrics["vitserve_errors_total"] == 2
        # two results, the one the drain waits for, the two refused
        assert (metrics["vitserve_requests_total"], metrics["vitserve_results_total"]) == (5, 2)
        check_histograms(metrics, results=2, windows_unfinished=1)
        assert process.wait(WAIT_S) == 0  # the drain ended with the held request's result


async def drain_errors(endpoint: str, process, url: str, worker: int) -> dict[str, float]:
    """The metrics during the drain, after two requests refused with shutting_down; then the worker
    resumes, and the request the drain waited for gets its result."""
    async with AsyncClient(endpoint) as held, AsyncClient(endpoint) as late:
        running = asyncio.ensure_future(held.encode([image(BIG, 3)]))
        await until_stats(late, lambda s: s["windows_in_flight"] == 1, "a window in flight")
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S  # draining: readiness says so (once the signal is handled)
        while "shutting down" not in (readiness := await asyncio.to_thread(get, url + "/readyz"))[1]:
            assert time.monotonic() < deadline, f"the engine did not start draining: {readiness}"
            await asyncio.sleep(0.05)
        assert readiness[0] == 503
        for seed in range(2):
            await refused_async("shutting_down", late.encode([image(32, seed)]))
        metrics = await asyncio.to_thread(counted, url, 2)
        os.kill(worker, signal.SIGCONT)
        with await asyncio.wait_for(running, WAIT_S) as result:  # admitted before the signal: it finishes
            assert result.items[0].embeddings.shape[0] == 1024 // 4
    return metrics
