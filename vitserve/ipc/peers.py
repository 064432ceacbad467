"""Whether a local client's process still runs: how the engine takes back the shared-memory
slots of a client that exited without releasing its results.

A client names its pid and the process's start time (from /proc, in clock ticks since boot) in
its hello. The pair identifies one process even after the pid is reused. The engine keeps
watching only pairs it can verify at the hello: a client in another pid namespace (another
container sharing /dev/shm) cannot be watched this way, and its slots return on release only.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot, or None when no such process is visible."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, never existed here, or not readable
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself;
    # the fields after its last ")" start at field 3, and the start time is field 22.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def own_identity() -> tuple[int, int]:
    """(pid, start time) of this process, for the hello; start time 0 where /proc is not available."""
    pid = os.getpid()
    return pid, process_start(pid) or 0


def still_running(pid: int, start: int) -> bool:
    return process_start(pid) == start
