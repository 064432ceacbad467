"""The worker's end of its link to the engine (link.py): blocking, as the worker's loop is; it
connects on first use, retrying while the engine does not listen yet (`vitserve serve` spawns its
GPU workers before the engine is up)."""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque

from .link import LENGTH, RECEIVE_BYTES, LinkError, split_messages

CONNECT_RETRY_S = 0.01  # a worker started before the engine listens tries again this often


class WorkerLink:
    """The worker's end: blocking; connects to the engine's `path` on first use."""

    def __init__(self, path: str, engine_pid: int):
        self.path = path
        self.engine_pid = engine_pid  # while it connects: give up once the engine is gone
        self._socket: socket.socket | None = None
        self._poller = select.poll()
        self._buffer = bytearray()
        self._messages: deque[bytes] = deque()
        self._ended = False

    def _connect(self) -> socket.socket:
        while self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):  # the engine does not listen yet
                sock.close()
                if os.getppid() != self.engine_pid:
                    raise LinkError(f"the engine (pid {self.engine_pid}) is gone") from None
                time.sleep(CONNECT_RETRY_S)
                continue
            self._socket = sock
            self._poller.register(sock, select.POLLIN)
        return self._socket

    def send(self, message: bytes) -> None:
        """LinkError when the engine's end is gone."""
        try:
            self._connect().sendall(LENGTH.pack(len(message)) + message)
        except OSError as err:
            raise LinkError(f"the engine's end of the link is gone ({err})") from None

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message is there or arriving (its first bytes: `receive` waits for the rest),
        or the end of the stream, within `timeout_ms`."""
        if self._messages or self._ended:
            return True
        self._connect()
        if not self._poller.poll(timeout_ms):
            return False
        self._read()
        return True

    def _read(self) -> None:
        try:
            data = self._socket.recv(RECEIVE_BYTES)
        except OSError:
            data = b""
        if not data:
            self._ended = True
            return
        self._buffer += data
        split_messages(self._buffer, self._messages)

    def receive(self) -> bytes:
        """The next message, waiting for it; LinkError once the engine's end is closed."""
        self._connect()
        while not self._messages:
            if self._ended:
                raise LinkError("the engine closed its end of the link")
            self._read()
        return self._messages.popleft()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
