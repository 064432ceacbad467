"""`vitserve serve --http-port`: Prometheus metrics that equal what happened, liveness and readiness
with the right status codes and reasons, and a port that cannot be had refused before the start."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from served import served

from vitserve import Client
from vitserve.engine import EngineError
from vitserve.engine.metrics import METRICS
from vitserve.preprocess import preprocess_image

FLAGS = ("--min-budget", "64", "--max-budget", "512", "--max-item-tokens", "16384", "--http-port", "0")


def http_url(process: subprocess.Popen) -> str:
    """The URL `vitserve serve` says it serves HTTP on (stderr, before it is ready)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([process.stderr], [], [], 1)[0]:
            continue
        line = process.stderr.readline()
        found = re.search(r"metrics on (http://[0-9.]+:\d+)/metrics", line)
        if found:
            return found.group(1)
        if not line:  # (it ended)
            break
    raise AssertionError("vitserve serve did not say where its metrics are")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(url: str) -> dict[str, float]:
    status, text = get(url + "/metrics")
    assert status == 200
    def key(sample) -> str:  # name{label=value,...}
        labels = ",".join(f"{name}={value}" for name, value in sorted(sample.labels.items()))
        return sample.name + (f"{{{labels}}}" if labels else "")

    return {key(sample): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_metrics_equal_what_happened_and_probes_say_why(tmp_path):
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, *FLAGS) as process:
        url = http_url(process)
        assert get(url + "/livez") == (200, "alive\n")
        status, text = get(url + "/readyz")
        assert status == 200 and text.startswith("ready: 1 of 1 workers up")
        with Client(endpoint) as client:
            for seed in range(3):
                with client.encode([image(64 + 32 * seed, seed), image(96, seed)]):
                    pass
            try:
                client.encode([image(2200)])  # past --max-item-tokens
            except EngineError as err:
                assert err.code == "too_large"
            stats = client.stats()
        metrics = scrape(url)
        assert (metrics["vitserve_requests_total"], metrics["vitserve_results_total"],
                metrics["vitserve_errors_total"]) == (4, 3, 1)
        assert metrics["vitserve_window_items_total"] == 6 and 1 <= metrics["vitserve_windows_total"] <= 6
        assert metrics["vitserve_ready"] == 1 and metrics["vitserve_workers_ready"] == 1
        assert metrics["vitserve_worker_seconds_total"] == stats["worker_ms"] / 1e3
        assert set(stats) <= set(METRICS), "every stat has its metric name, type and help"
        # one observation per request, per window and per item sent, in buckets that add up
        assert metrics["vitserve_end_to_end_seconds_count"] == 3  # (the refused request never queued)
        assert metrics["vitserve_request_errors_total{code=too_large}"] == 1
        runs = {name: value for name, value in metrics.items() if name.startswith("vitserve_runs_total")}
        assert sum(runs.values()) >= metrics["vitserve_windows_total"] and all("path=" in name for name in runs)
        sent = [image(64 + 32 * seed, seed) for seed in range(3)] + [image(96)] * 3
        assert metrics["vitserve_run_tokens_total"] == sum(int(preprocess_image(item).grid_thw.prod()) for item in sent)
        assert metrics["vitserve_window_run_seconds_count"] == metrics["vitserve_windows_total"]
        assert metrics["vitserve_queue_wait_seconds_count"] == metrics["vitserve_window_items_total"]
        for per_window in ("preprocess_seconds", "output_transfer_seconds", "items_per_window", "sequences_per_window"):
            assert metrics[f"vitserve_{per_window}_count"] == metrics["vitserve_windows_total"], per_window
        assert metrics["vitserve_items_per_window_sum"] == 6 and metrics["vitserve_sequences_per_window_sum"] == 6
        assert metrics["vitserve_output_transfer_seconds_sum"] > 0 and metrics["vitserve_preprocess_seconds_sum"] > 0
        assert metrics["vitserve_queued_tokens"] == 0 and metrics["vitserve_output_slots"] > 0
        assert metrics["vitserve_worker_windows_total{worker=0}"] == metrics["vitserve_windows_total"]
        buckets = [value for name, value in metrics.items() if name.startswith("vitserve_end_to_end_seconds_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == 3 and metrics["vitserve_end_to_end_seconds_bucket{le=+Inf}"] == 3
        assert 0 < metrics["vitserve_end_to_end_seconds_sum"] < 60
        assert get(url + "/nothing-here")[0] == 404
        with Client(endpoint) as client:  # the drain, with a request of about a second in flight
            running = threading.Thread(target=lambda: client.encode([image(1536, 9)]).release())
            running.start()
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            status, text = get(url + "/readyz")
            assert status == 503 and "not ready: shutting down" in text
            assert get(url + "/livez") == (200, "alive\n")
            running.join(60)
        assert process.wait(60) == 0
        with pytest.raises(urllib.error.URLError):  # shut down: nothing answers on the port any more
            urllib.request.urlopen(url + "/livez", timeout=5)


def test_a_port_that_is_taken_is_refused_before_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", f"ipc://{tmp_path}/t.sock",
                               "--http-port", str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"--http-port: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_probes_run_one_at_a_time_and_a_stuck_loop_is_not_alive():
    import asyncio

    from vitserve.engine.http_endpoint import PROBE_TIMEOUT_S, HttpEndpoint, Snapshot
    from vitserve.engine.run_counts import RunTotals
    from vitserve.ipc.messages import Health

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    running, most, stall, snapshots = [0], [0], [0.0], [0]

    def snapshot():  # on the loop's thread, as the engine's would be
        snapshots[0] += 1
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(stall[0] or 0.05)
        running[0] -= 1
        return Snapshot({}, Health(True, 1, 1, "", [], 0), {}, {}, RunTotals({}, 0, 0, {}, {}))

    web = HttpEndpoint("127.0.0.1", 0)
    web.start(loop, snapshot)
    try:
        probes = [threading.Thread(target=get, args=(web.url + "/livez",)) for _ in range(6)]
        for probe in probes:
            probe.start()
        for probe in probes:
            probe.join(30)
        assert most[0] == 1  # (the loop is single-threaded anyway: the lock keeps waiting probes off it)
        stall[0] = PROBE_TIMEOUT_S + 1.5  # a loop that does not come back in time
        calls = snapshots[0]
        began = time.monotonic()
        status, text = get(web.url + "/livez")
        assert status == 503 and "did not answer" in text and time.monotonic() - began < PROBE_TIMEOUT_S + 1
        status, text = get(web.url + "/readyz")  # the loop still has the last probe: not asked again
        assert status == 503 and "has not answered the last probe" in text and snapshots[0] == calls + 1
    finally:
        web.close()
        loop.call_soon_threadsafe(loop.stop)


def wait_for(url: str, status: int, timeout_s: float = 60) -> str:
    """The body of the first answer with `status` within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, text = get(url)
        if code == status:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s} s (last: {code} {text!r})")


def test_readiness_follows_a_stopped_and_a_killed_worker_liveness_stays(tmp_path):
    import os

    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "512", "--http-port", "0",
                "--worker-heartbeat-s", "0.3") as process:
        url = http_url(process)
        for fault in (signal.SIGSTOP, signal.SIGKILL):  # a hung worker (silent heartbeat), then a dead one
            with Client(endpoint) as client:
                worker = client.health().worker_pids[0]
            os.kill(worker, fault)
            reason = wait_for(url + "/readyz", 503, timeout_s=10)
            assert "not ready:" in reason and ("not responding" in reason or "no worker is up" in reason), reason
            assert get(url + "/livez") == (200, "alive\n")  # the engine itself is fine
            assert wait_for(url + "/readyz", 200).startswith("ready: 1 of 1 workers up")  # restarted
            with Client(endpoint) as client:
                assert client.health().worker_pids[0] != worker


def test_a_result_after_its_deadline_is_counted_as_late():
    """A deadline miss either fails (deadline_exceeded, an error by code) or, when the result comes
    anyway, counts in vitserve_late_results_total; a request in time counts in neither."""
    import asyncio

    from vitserve import Engine, EngineConfig
    from vitserve.workers import WindowConfig

    async def run() -> tuple[int, float]:
        async with Engine(EngineConfig(window=WindowConfig(min_budget=64, max_budget=512))) as engine:
            (await engine.encode([image(64)], deadline_ms=60_000)).release()  # in time
            try:
                (await engine.encode([image(1024, 1)], deadline_ms=1)).release()  # a CPU window takes longer
                late = 1
            except EngineError as err:
                assert err.code == "deadline_exceeded"
                late = 0
            return late, engine.stats()["late_results"]

    late, counted = asyncio.run(run())
    assert counted == late


def test_while_the_engine_starts_it_is_alive_and_not_ready(tmp_path):
    """The HTTP endpoint answers before the model is loaded: alive, not ready ("starting"), then ready;
    a killed worker counts as a restart in /metrics."""
    import os

    command = [sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", f"ipc://{tmp_path}/s.sock",
               "--min-budget", "64", "--max-budget", "512", "--http-port", "0", "--cache-dir", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = http_url(process)
        status, text = get(url + "/readyz")
        assert (status, get(url + "/livez")[0]) == (503, 200) and "starting" in text, text  # (measuring costs)
        assert wait_for(url + "/readyz", 200).startswith("ready")
        with Client(f"ipc://{tmp_path}/s.sock") as client:
            os.kill(client.health().worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while scrape(url)["vitserve_worker_restarts_total"] < 1:  # counted once the worker is started again
            assert time.monotonic() < deadline, "the killed worker was not counted as restarted"
            time.sleep(0.2)
        assert wait_for(url + "/readyz", 200).startswith("ready")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def test_an_embedded_engine_answers_the_same_probes():
    from vitserve.engine import EngineConfig
    from vitserve.integrations.embedded import EmbeddedEncoder
    from vitserve.workers import WindowConfig

    config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=512), max_item_tokens=4096)
    with EmbeddedEncoder(config, http=("127.0.0.1", 0)) as encoder:
        url = encoder.http_url
        assert get(url + "/livez") == (200, "alive\n") and get(url + "/readyz")[0] == 200
        for seed in range(2):
            encoder.encode([image(64, seed)]).release()
        try:
            encoder.encode([image(2200)])
        except EngineError as err:
            assert err.code == "too_large"
        deadline = time.monotonic() + 10
        while (metrics := scrape(url)).get("vitserve_request_errors_total{code=too_large}") != 1:
            assert time.monotonic() < deadline, metrics  # (counted on the engine's loop, a moment later)
            time.sleep(0.05)
        assert metrics["vitserve_end_to_end_seconds_count"] == 2 and metrics["vitserve_ready"] == 1
    try:  # closed with the encoder: nothing listens
        urllib.request.urlopen(url + "/livez", timeout=5)
        answered = True
    except urllib.error.HTTPError:
        answered = True
    except urllib.error.URLError:
        answered = False
    assert not answered, "the embedded engine's HTTP endpoint outlived it"
