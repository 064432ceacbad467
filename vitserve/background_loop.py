"""`BackgroundLoop`: an asyncio event loop in a daemon thread, for the synchronous wrappers of async
objects (the sync `Client`, `EmbeddedEncoder`): their state belongs to that loop's thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def running(self) -> bool:
        return self._loop.is_running()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the loop's thread (for state only that thread may touch)."""
        async def on_loop() -> T:
            return function(*args)
        return self.call(on_loop())

    def stop(self) -> None:
        """Stop the loop and its thread (once), and close it."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()
