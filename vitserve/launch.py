"""Starting worker processes: what a worker needs when it is spawned (`WorkerSpec`), and the start
of the GPU workers of `vitserve serve` before the engine's own imports.

This module imports no torch. A worker process spends seconds importing torch and loading the
model before it can serve, and the engine's process spends seconds on its own imports before it
would spawn one: `vitserve serve` calls `launch_early` first thing, so the two overlap, and the
engine adopts the processes (engine/worker_handle.py). Everything else a worker needs (window
and preprocessing settings, a cost model to reuse) comes later, in the engine's Begin message.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to load its model: picklable for the spawn start method."""

    worker: int
    endpoint: str  # the path of the engine's end of the link (ipc/link.py)
    model: str
    device: str
    dtype: str | None
    threads: int | None = None  # torch CPU threads (CPU workers share the host)
    log_level: int = logging.WARNING
    heartbeat_s: float = 1.0  # how often the worker's beat thread beats
    progress: bool = False  # say each start-up phase on stderr (`vitserve serve` does)
    spawned_at: float = field(default=0.0, compare=False)  # time.monotonic() at the spawn (0: unknown)
    # Where the beats go: the engine's shared double (a multiprocessing RawValue, picklable only
    # while the process is spawned); None: no heartbeat (a worker run by hand, as tools/ do).
    beat_at: Any = field(default=None, compare=False, repr=False)


def worker_endpoint(socket_dir: str, worker: int, epoch: int) -> str:
    return f"{socket_dir}/worker-{worker}-e{epoch}"


def spawn(spec: WorkerSpec, target) -> tuple[WorkerSpec, multiprocessing.process.BaseProcess]:
    """Start `target(spec)` in a new (spawned) daemon process; the spec as it was sent."""
    spec = replace(spec, spawned_at=time.monotonic())
    process = multiprocessing.get_context("spawn").Process(
        target=target, args=(spec,), name=f"vitserve-worker-{spec.worker}", daemon=True)
    process.start()
    return spec, process


def run_worker(spec: WorkerSpec) -> None:
    """The early workers' entry point: the worker's heavy modules are imported in the child only."""
    from vitserve.workers.process import worker_main

    worker_main(spec)


@dataclass
class EarlyWorkers:
    """Worker processes started before the engine, for it to adopt (epoch 0)."""

    socket_dir: str  # where their endpoints are: the engine's socket directory
    started: dict[int, tuple[WorkerSpec, multiprocessing.process.BaseProcess, Any]]  # worker -> (spec, process, heartbeat)

    def take(self, expected: WorkerSpec):
        """(spec, process, heartbeat) of the worker started for exactly `expected` (spawn time and
        beat aside), or None; a process started for other settings is stopped."""
        entry = self.started.pop(expected.worker, None)
        if entry is not None and entry[0] != expected:
            logging.getLogger(__name__).warning("the worker process started early for %s does not match the "
                                                "engine's settings (%s): starting another", entry[0], expected)
            entry[1].kill()
            entry[1].join()  # gone before its socket path is bound again
            return None
        return entry

    def discard_unadopted(self) -> None:
        """Stop the processes the engine did not adopt (the directory is the engine's now)."""
        for _, process, _ in self.started.values():
            process.kill()
            process.join()
        self.started.clear()

    def discard(self) -> None:
        """Stop them all and remove the directory: no engine will run (e.g. its settings were refused)."""
        self.discard_unadopted()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def launch_early(model: str, devices: tuple[str, ...], dtype: str | None, heartbeat_s: float,
                 progress: bool) -> EarlyWorkers | None:
    """Spawn the workers of the GPU devices among `devices` now; None when there are none. CPU
    workers share the host's cores with the engine's imports, and start in seconds anyway."""
    from vitserve.engine.liveness import Heartbeat  # (the engine package is light to import)

    gpus = [(worker, device) for worker, device in enumerate(devices) if not device.startswith("cpu")]
    if not gpus:
        return None
    early = EarlyWorkers(tempfile.mkdtemp(prefix="vitserve-"), {})
    for worker, device in gpus:
        heartbeat = Heartbeat(heartbeat_s)
        spec = WorkerSpec(worker=worker, endpoint=worker_endpoint(early.socket_dir, worker, 0), model=model,
                          device=device, dtype=dtype, log_level=logging.getLogger().level,
                          heartbeat_s=heartbeat_s, progress=progress, beat_at=heartbeat.beat_at)
        spec, process = spawn(spec, run_worker)
        early.started[worker] = (spec, process, heartbeat)
    return early
