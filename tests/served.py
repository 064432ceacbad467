"""A `vitserve serve` process for end-to-end tests, and a raw ZeroMQ peer that sends any frames."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import zmq

from vitserve.ipc.codec import client_codec
from vitserve.ipc.messages import PROTOCOL_VERSION, Encode, Hello, Stats, StatsQuery, Welcome


def local_endpoint(scheme: str, folder) -> str:
    """An endpoint for a test server: ipc:// in `folder`, or tcp:// on a free local port."""
    if scheme == "ipc":
        return f"ipc://{folder}/vitserve.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


@contextmanager
def served(endpoint: str, *flags: str):
    """`vitserve serve` on `endpoint` (tiny model, CPU) until the block ends; it must exit cleanly on SIGTERM,
    unless the block killed and reaped it on purpose. A server that neither starts nor stops in time
    fails the test with every thread's stack (its SIGUSR1) and its stderr."""
    command = [sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", endpoint, *flags]
    # its own process group: a stuck server's workers are signalled with it (stuck())
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    line = process.stdout.readline() if select.select([process.stdout], [], [], START_TIMEOUT_S)[0] else ""
    if "ready" not in line:
        pytest.fail(f"vitserve serve did not start within {START_TIMEOUT_S} s: {line}{stuck(process)}")
    try:
        yield process
    finally:
        if process.returncode is None:  # still ours to stop: a crash of its own shows as a non-zero exit
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"vitserve serve did not exit within {STOP_TIMEOUT_S} s of SIGTERM:\n{stuck(process)}")
            assert code == 0, process.stderr.read()


def stuck(process: subprocess.Popen) -> str:
    """What a server that does not answer was doing: its and its workers' threads' stacks (SIGUSR1 to
    the process group), then they are killed; their stderr, as much as comes within 30 s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGUSR1)
            time.sleep(1)
            os.killpg(process.pid, signal.SIGKILL)
    try:
        return process.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        return "(its stderr stayed open past 30 s: a child still holds it)"


class RawPeer:
    """A DEALER socket that sends arbitrary frames and collects the replies to each message."""

    def __init__(self, endpoint: str, receive_hwm: int | None = None, hello: bool = True):
        """`hello`: shake hands first (the engine answers nothing else before), and take the welcome."""
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if receive_hwm is not None:  # how many unread replies this peer's side queues (ZeroMQ's default: 1000)
            self.socket.setsockopt(zmq.RCVHWM, receive_hwm)
        self.socket.connect(endpoint)
        self.codec = client_codec()
        if hello:
            self.socket.send_multipart(self.codec.encode(Hello(PROTOCOL_VERSION)))
            welcome = self.receive()[0]
            assert isinstance(welcome, Welcome), welcome
            self.welcome = welcome

    def ask(self, frames: list) -> list:
        """Send `frames`, then a stats query as a barrier: the replies that came before its answer."""
        self.socket.send_multipart(frames, copy=False)
        return self.barrier()

    def barrier(self, replies: list | None = None) -> list:
        self.socket.send_multipart(self.codec.encode(StatsQuery()))
        replies = replies or []
        while not isinstance((reply := self.receive())[0], Stats):
            replies.append(reply)
        return replies

    def receive(self) -> tuple:
        assert self.socket.poll(30_000), "the server stopped answering"
        return self.codec.decode(self.socket.recv_multipart(copy=False))

    def encode(self, request_id: int, items: list, arrays: list, deadline_ms=None) -> list:
        """An encode request: every reply up to its own (a result takes a window's time), then a barrier."""
        self.socket.send_multipart(self.codec.encode(Encode(request_id, items, deadline_ms), arrays), copy=False)
        replies = [self.receive()]
        while getattr(replies[-1][0], "id", None) != request_id:
            replies.append(self.receive())
        return self.barrier(replies)

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()
