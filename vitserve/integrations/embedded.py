"""`EmbeddedEncoder`: an `Engine` in this process for synchronous callers (a Hugging Face model's
forward, a batch script): the engine runs on a private event loop in a background thread, as the
sync `Client` runs its `AsyncClient`. Results may be released from any thread (the engine defers
a release to its loop)."""

from __future__ import annotations

from typing import Any, Sequence

from vitserve.background_loop import BackgroundLoop
from vitserve.engine import Engine, EngineConfig
from vitserve.ipc.messages import ServedModel
from vitserve.ipc.outputs import Encoded


class EmbeddedEncoder:
    """An engine of this process with a blocking `encode`; `close()` (or `with`) stops it."""

    def __init__(self, config: EngineConfig):
        self._background = BackgroundLoop("vitserve-embedded")
        self._engine = Engine(config)
        try:
            self._background.call(self._engine.start())
        except BaseException:
            self._background.stop()
            raise

    @property
    def model(self) -> ServedModel:
        return self._engine.model

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        return self._background.call(self._engine.encode(items, deadline_ms, priority, keep, keep_s))

    def lookup(self, names: Sequence[str]) -> Encoded:
        return self._background.call(self._engine.lookup(names))

    def forget(self, names: Sequence[str]) -> int:
        return self._background.run(self._engine.forget, names)

    def stats(self) -> dict[str, float]:
        return self._background.run(self._engine.stats)

    def close(self) -> None:
        if self._background.running:
            self._background.call(self._engine.close())
        self._background.stop()

    def __enter__(self) -> EmbeddedEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
