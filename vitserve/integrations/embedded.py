"""`EmbeddedEncoder`: an `Engine` in this process for synchronous callers (a Hugging Face model's
forward, a batch script): the engine runs on a private event loop in a background thread, as the
sync `Client` runs its `AsyncClient`. Results may be released from any thread (the engine defers
a release to its loop)."""

from __future__ import annotations

import collections
from typing import Any, Sequence

from vitserve.background_loop import BackgroundLoop
from vitserve.engine import Engine, EngineConfig, EngineError
from vitserve.engine.http_endpoint import HttpEndpoint
from vitserve.ipc.messages import ServedModel
from vitserve.ipc.outputs import Encoded


class EmbeddedEncoder:
    """An engine of this process with a blocking `encode`; `close()` (or `with`) stops it. With
    `http=(host, port)` it answers /metrics, /livez and /readyz as `vitserve serve --http-port` does
    (port 0: a free one, `http_url` says which); the requests it counts are those its `encode` got."""

    def __init__(self, config: EngineConfig, http: tuple[str, int] | None = None):
        self._web = HttpEndpoint(*http) if http is not None else None  # (a taken port: OSError before the start)
        self._background = BackgroundLoop("vitserve-embedded")
        self._engine = Engine(config)
        self._error_codes: collections.Counter[str] = collections.Counter()
        try:
            self._background.call(self._engine.start())
        except BaseException:
            self._background.stop()
            if self._web is not None:
                self._web.close()
            raise
        if self._web is not None:
            self._web.start(self._background.loop, lambda: self._engine.snapshot(None, self._error_codes))

    @property
    def http_url(self) -> str | None:
        return self._web.url if self._web is not None else None

    @property
    def model(self) -> ServedModel:
        return self._engine.model

    def encode(self, items: Sequence[Any], deadline_ms: float | None = None, priority: int = 0,
               keep: Sequence[str] | None = None, keep_s: float | None = None) -> Encoded:
        try:
            return self._background.call(self._engine.encode(items, deadline_ms, priority, keep, keep_s))
        except EngineError as err:
            self._background.loop.call_soon_threadsafe(self._error_codes.update, [err.code])  # (counted on the loop)
            raise

    def lookup(self, names: Sequence[str]) -> Encoded:
        return self._background.call(self._engine.lookup(names))

    def forget(self, names: Sequence[str]) -> int:
        return self._background.run(self._engine.forget, names)

    def stats(self) -> dict[str, float]:
        return self._background.run(self._engine.stats)

    def close(self) -> None:
        if self._web is not None:
            self._web.close()
        if self._background.running:
            self._background.call(self._engine.close())
        self._background.stop()

    def __enter__(self) -> EmbeddedEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
