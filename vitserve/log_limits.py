"""Logging that traffic cannot flood: each kind of event is logged in full the first time, then at
most once per interval with a count of what was left out.

A hostile or broken client can send thousands of bad messages a second; a traceback for each
would fill the disk and cost more than answering them. Events are counted by kind (a short
constant string), so the log says how often each happened without saying it every time.
"""

from __future__ import annotations

import logging
import time

DEFAULT_INTERVAL_S = 10.0


class LogLimiter:
    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}  # kind -> monotonic time of its last line
        self._left_out: dict[str, int] = {}  # kind -> events since that line

    def log(self, level: int, kind: str, message: str, *args: object, exc_info: bool = False) -> bool:
        """Log `message % args` unless a line of this `kind` went out within the interval; True when
        it was logged. The first line of a kind carries `exc_info`; later ones only the count."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return False
        left_out = self._left_out.pop(kind, 0)
        suffix = f" ({left_out} more like this in the last {now - last:.0f} s)" if left_out else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info and last is None)
        self._last[kind] = now
        return True

    def warning(self, kind: str, message: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.WARNING, kind, message, *args, exc_info=exc_info)

    def error(self, kind: str, message: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, kind, message, *args, exc_info=exc_info)
