"""`vitserve serve` while its engine starts: it says so at once, its endpoint answers health with
"starting", a client that connects meanwhile is welcomed once the engine is ready, and a signal
stops the start cleanly. (Before, nothing answered and nothing was printed until the model was
loaded, its graphs captured and its cost model measured: minutes on a CPU, and "starting" looked
like "dead".)"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from served import RawPeer, served
from slab_helpers import socket_files_left

from vitserve import Client
from vitserve.ipc.messages import Health, HealthQuery

FLAGS = ("--min-budget", "64", "--max-budget", "512")


def start(endpoint: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", endpoint, *FLAGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()  # said at once, before the model is even loaded
    assert line.startswith("vitserve: starting on") and endpoint in line, line
    return process


def test_health_says_starting_and_a_client_connecting_meanwhile_is_welcomed_once_ready(tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    process = start(endpoint)
    try:
        peer = RawPeer(endpoint, hello=False)  # health needs no hello
        try:
            peer.socket.send_multipart(peer.codec.encode(HealthQuery()))
            health = peer.receive()[0]
        finally:
            peer.close()
        assert isinstance(health, Health) and not health.ready and health.detail.startswith("starting"), health
        assert health.workers == 1 and health.workers_ready == 0

        outcome = {}

        def connect_early() -> None:  # a client started alongside the server
            with Client(endpoint) as client:
                outcome["welcomed_at"] = time.monotonic()
                with client.encode([np.full((64, 64, 3), 9, np.uint8)]) as result:
                    outcome["rows"] = result.items[0].embeddings.shape[0]

        early = threading.Thread(target=connect_early)
        early.start()
        ready_line = process.stdout.readline()
        ready_at = time.monotonic()
        assert "vitserve ready on" in ready_line, ready_line
        early.join(60)
        assert outcome.get("rows") == 64, outcome  # a 64² image is resized to the minimum: 256 patches
        assert outcome["welcomed_at"] >= ready_at - 0.5  # welcomed when the engine was ready, not before
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, process.stderr.read()
    assert socket_files_left(endpoint) == []


def test_a_signal_during_the_start_stops_it_cleanly(tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    process = start(endpoint)
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, process.stderr.read()
    assert time.monotonic() - began < 30
    assert "ready" not in process.stdout.read()
    assert socket_files_left(endpoint) == []


def test_sigusr1_prints_every_threads_stack_and_the_server_goes_on(tmp_path):
    """`kill -USR1` on a server (or a worker) shows what it is doing, without stopping it."""
    endpoint = f"ipc://{tmp_path}/stacks.sock"
    with served(endpoint, *FLAGS) as process:
        process.send_signal(signal.SIGUSR1)
        with Client(endpoint) as client, client.encode([np.zeros((64, 64, 3), np.uint8)]) as result:
            assert result.items[0].embeddings.shape[0] > 0
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0
    assert "Current thread" in stderr and "vitserve/engine/serve.py" in stderr  # the main thread, in its loop


@pytest.mark.parametrize("model", ["missing-dir", "random:nope", "llama-dir", "no-weights-dir"])
def test_a_model_that_cannot_be_served_is_refused_at_once_in_one_line(tmp_path, model):
    """Before any worker starts (seconds, not a start's minutes), with what to change, no traceback."""
    import json

    source = {"missing-dir": str(tmp_path / "missing"), "random:nope": "random:nope"}.get(model, str(tmp_path))
    if model == "llama-dir":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if model == "no-weights-dir":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {}}))
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--model", source, "--endpoint",
                           f"ipc://{tmp_path}/refused.sock"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - began < 20
    assert done.stderr.startswith("vitserve serve: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and not socket_files_left(f"ipc://{tmp_path}/refused.sock")


def test_json_logs_are_one_object_per_line_workers_too(tmp_path):
    import json

    endpoint = f"ipc://{tmp_path}/json.sock"
    with served(endpoint, *FLAGS, "--log-format", "json", "-v") as process:
        with Client(endpoint) as client, client.encode([np.zeros((64, 64, 3), np.uint8)]):
            pass
    lines = [line for line in process.stderr.read().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [entry["event"] for entry in entries if "event" in entry]
    assert events[0].startswith("starting on") and entries[0]["endpoint"] == endpoint
    assert any(entry.get("phase", "").startswith("loading") and entry.get("worker") == 0 for entry in entries)
    assert all({"time", "level"} <= set(entry) for entry in entries)
