"""`EmbeddedEncoder`: an `Engine` in this process for synchronous callers (a Hugging Face model's
forward, a batch script): the engine runs on a private event loop in a background thread, as the
sync `Client` runs its `AsyncClient`. Results may be released from any thread (the engine defers
a release to its loop)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from vitserve.engine import Engine, EngineConfig
from vitserve.ipc.messages import ServedModel
from vitserve.ipc.outputs import Encoded


class EmbeddedEncoder:
    """An engine of this process with a blocking `encode`; `close()` (or `with`) stops it."""

    def __init__(self, config: EngineConfig):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vitserve-embedded", daemon=True)
        self._thread.start()
        self._engine = Engine(config)
        try:
            self._call(self._engine.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def model(self) -> ServedModel:
        return self._engine.model

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        return self._call(self._engine.encode(items, deadline_ms, priority, keep, keep_s))

    def lookup(self, names: Sequence[str]) -> Encoded:
        return self._call(self._engine.lookup(names))

    def forget(self, names: Sequence[str]) -> int:
        async def forget() -> int:  # on the engine's loop: its state is that thread's
            return self._engine.forget(names)
        return self._call(forget())

    def stats(self) -> dict[str, float]:
        async def read() -> dict[str, float]:  # on the engine's loop: its state is that thread's
            return self._engine.stats()
        return self._call(read())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._engine.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> EmbeddedEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
