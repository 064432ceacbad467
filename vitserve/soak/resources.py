"""The engine's footprint on its host, sampled at the start and end of a soak run: resident memory
of the engine and its workers, GPU memory in use, and its shared-memory slabs (the sealed memory
files it holds, as /proc/<pid>/fd lists them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from vitserve.ipc.slabs import parse_slab_name

MIB = 1 << 20


@dataclass(frozen=True)
class Footprint:
    rss_mib: float  # engine and workers together
    engine_rss_mib: float  # of which the engine process
    gpu_mib: float | None  # used on the engine's GPUs (None: no nvidia-smi, or CPU devices)
    shm_mib: float  # the engine's slab files
    shm_files: int


def footprint(engine_pid: int, worker_pids: list[int], gpus: list[int] | None) -> Footprint:
    rss = {}
    for pid in [engine_pid, *worker_pids]:
        try:
            rss[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:  # a worker that is being restarted
            pass
    sizes = list(slab_sizes(engine_pid).values())
    return Footprint(sum(rss.values()) / MIB, rss.get(engine_pid, 0) / MIB, gpu_used_mib(gpus), sum(sizes) / MIB,
                     len(sizes))


def slab_sizes(pid: int) -> dict[str, int]:
    """Bytes of each slab that process `pid` holds a descriptor of, by name."""
    sizes = {}
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or not ours to look at
        return sizes
    for fd in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            name = target.removeprefix("/memfd:").removesuffix(" (deleted)")
            if target.startswith("/memfd:") and parse_slab_name(name) is not None:
                sizes[name] = os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass  # closed while listing
    return sizes


def gpu_used_mib(gpus: list[int] | None) -> float | None:
    """Device memory in use on `gpus` (None: every GPU), from nvidia-smi (what the driver sees, graphs
    and pools included); None without GPUs or nvidia-smi."""
    if gpus == [] or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    used = {int(index): float(mib) for index, mib in (line.split(",") for line in out.strip().splitlines())}
    return sum(used.values()) if gpus is None else sum(used.get(gpu, 0.0) for gpu in gpus)


def gpu_indices(devices: list[str]) -> list[int]:
    """CUDA device indices of devices like "cuda:1" ("cuda" alone is 0)."""
    return [int(d.partition(":")[2] or 0) for d in devices if d.startswith("cuda")]


@dataclass(frozen=True)
class Growth:
    """How much each footprint may grow over the run before it counts as a leak."""

    rss_mib: float = 256.0
    gpu_mib: float = 512.0

    def violations(self, start: Footprint, end: Footprint) -> list[str]:
        found = []
        if end.rss_mib - start.rss_mib > self.rss_mib:
            found.append(f"resident memory grew from {start.rss_mib:.0f} to {end.rss_mib:.0f} MiB "
                         f"(allowed: {self.rss_mib:.0f} MiB)")
        if start.gpu_mib is not None and end.gpu_mib is not None and end.gpu_mib - start.gpu_mib > self.gpu_mib:
            found.append(f"GPU memory grew from {start.gpu_mib:.0f} to {end.gpu_mib:.0f} MiB "
                         f"(allowed: {self.gpu_mib:.0f} MiB)")
        if end.shm_mib > start.shm_mib or end.shm_files > start.shm_files:
            found.append(f"output slabs grew from {start.shm_files} files, {start.shm_mib:.0f} MiB to "
                         f"{end.shm_files} files, {end.shm_mib:.0f} MiB after every result was released")
        return found
