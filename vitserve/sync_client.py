"""`Client`: the thin sync wrapper of `AsyncClient` (client.py), on a private event loop in a
background thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Sequence

from vitserve.client import TIMEOUT_S, AsyncClient
from vitserve.client_link import HEARTBEAT_S
from vitserve.ipc.messages import Health, OutputRef, ServedModel
from vitserve.ipc.outputs import Encoded, EncodedItem


class Client:
    """The sync client: an AsyncClient on a private event loop in a background thread."""

    def __init__(self, endpoint: str, *, inline: bool | None = None, name: str = "",
                 timeout_s: float | None = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
                 curve_secret_key: str | Path | None = None, curve_server_key: str | Path | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vitserve-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(endpoint, inline=inline, name=name, timeout_s=timeout_s, heartbeat_s=heartbeat_s,
                                   curve_secret_key=curve_secret_key, curve_server_key=curve_server_key)
        self.welcome = self._call(self._client.connect())

    @property
    def model(self) -> ServedModel:
        """The engine's model: its type, the fingerprint of its vision weights, dtype, outputs, limits
        and preprocessing settings."""
        return self.welcome.model

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        return self._call(self._client.encode(items, deadline_ms, priority, keep, keep_s))

    def lookup(self, names: Sequence[str]) -> Encoded:
        return self._call(self._client.lookup(names))

    def forget(self, names: Sequence[str]) -> None:
        self._call(self._client.forget(names))

    def view(self, ref: OutputRef) -> EncodedItem:
        async def view() -> EncodedItem:  # on the client's loop: its slab mappings are that thread's
            return self._client.view(ref)
        return self._call(view())

    def stats(self) -> dict[str, float]:
        return self._call(self._client.stats())

    def health(self) -> Health:
        return self._call(self._client.health())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
