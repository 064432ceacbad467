"""What vitserve writes on stderr: lifecycle events, one line each (starting, the preprocessing in force,
each worker's start-up phases, ...), and log records; as text, or as JSON lines with `--log-format
json` (the setting travels to worker processes in VITSERVE_LOG_FORMAT, which they inherit)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMAT_ENV = "VITSERVE_LOG_FORMAT"
FORMATS = ("text", "json")


def json_lines() -> bool:
    return os.environ.get(FORMAT_ENV) == "json"


def event(message: str, **fields: object) -> None:
    """One lifecycle event on stderr: `vitserve: <message>`, or a JSON object with the fields too."""
    if json_lines():
        line = json.dumps({"time": round(time.time(), 3), "level": "info", "event": message, **fields}, default=str)
    else:
        line = f"vitserve: {message}"
    print(line, file=sys.stderr, flush=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int, prefix: str = "") -> None:
    """The root logger at `level`, in the chosen format (text lines start with `prefix`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines() else
                         logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
