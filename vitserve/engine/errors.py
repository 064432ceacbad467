"""The exception a request raises when it ends without a result."""

from __future__ import annotations


class EngineError(Exception):
    """A request that ended without a result; `code` is one of the wire protocol's error codes."""

    def __init__(self, code: str, message: str, retry_after_ms: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
