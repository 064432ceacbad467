"""Worker liveness by heartbeat: the engine's side.

A worker that is alive but runs nothing (stopped by a signal, a cgroup freezer or a debugger)
answers no window and sends nothing, so neither its exit nor a closed socket reveals it. So each
worker writes the time of its latest beat into shared memory from a thread of its own
(workers/process.py), every `worker_heartbeat_s`, even while its main thread runs a long window;
a stopped or dead process stops writing. (When only the main thread hangs, the beats go on: the
window watchdog, `window_timeout_s`, catches that.) The engine reads the time when a receive
loop wakes without messages. It is CLOCK_MONOTONIC (`time.monotonic()`), one clock for every
process of the host, so the engine sees how old the beat is, not when it happened to look: an
engine that was itself slow to look never mistakes that for a silent worker.

Shared memory rather than heartbeat messages: ZeroMQ sockets are not thread-safe, so a beat
thread would need a socket, an endpoint and an engine-side receiver of its own; one shared
double needs none of them, and reading it costs nothing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import time

# A worker whose latest beat is older than this many heartbeats is hung: taken out of service,
# its windows retried or failed, then killed and restarted. A few, so that a late beat (a busy
# host) is no fault.
HUNG_AFTER_BEATS = 3


class Heartbeat:
    """Where one worker process writes its latest beat, and how old that beat is."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        # Created before the process is spawned: it travels to the child with the process's
        # arguments. Starts at "now": the worker's first beat comes before its readiness report.
        self.beat_at = multiprocessing.get_context("spawn").RawValue(ctypes.c_double, time.monotonic())

    @property
    def grace_s(self) -> float:
        return HUNG_AFTER_BEATS * self.period_s

    def silent_s(self) -> float:
        """Seconds since the worker's latest beat."""
        return time.monotonic() - self.beat_at.value

    def hung(self) -> bool:
        return self.silent_s() > self.grace_s
