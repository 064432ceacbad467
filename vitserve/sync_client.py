"""`Client`: the thin sync wrapper of `AsyncClient` (client.py), on a private event loop in a
background thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vitserve.background_loop import BackgroundLoop
from vitserve.client import TIMEOUT_S, AsyncClient
from vitserve.client_link import HEARTBEAT_S
from vitserve.ipc.messages import Health, OutputRef, ServedModel
from vitserve.ipc.outputs import Encoded, EncodedItem


class Client:
    """The sync client: an AsyncClient on a private event loop in a background thread."""

    def __init__(self, endpoint: str, *, inline: bool | None = None, name: str = "",
                 timeout_s: float | None = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
                 curve_secret_key: str | Path | None = None, curve_server_key: str | Path | None = None,
                 direct: bool = True):
        self._background = BackgroundLoop("vitserve-client")
        self._call = self._background.call
        self._client = AsyncClient(endpoint, inline=inline, name=name, timeout_s=timeout_s, heartbeat_s=heartbeat_s,
                                   curve_secret_key=curve_secret_key, curve_server_key=curve_server_key,
                                   direct=direct)
        self.welcome = self._call(self._client.connect())

    @property
    def model(self) -> ServedModel:
        """The engine's model: its type, the fingerprint of its vision weights, dtype, outputs, limits
        and preprocessing settings."""
        return self.welcome.model

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        return self._call(self._client.encode(items, deadline_ms, priority, keep, keep_s))

    def lookup(self, names: Sequence[str]) -> Encoded:
        return self._call(self._client.lookup(names))

    def forget(self, names: Sequence[str]) -> None:
        self._call(self._client.forget(names))

    def view(self, ref: OutputRef) -> EncodedItem:
        return self._background.run(self._client.view, ref)  # (its slab mappings are the loop thread's)

    def stats(self) -> dict[str, float]:
        return self._call(self._client.stats())

    def health(self) -> Health:
        return self._call(self._client.health())

    def close(self) -> None:
        if self._background.running:
            self._call(self._client.close())
        self._background.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
