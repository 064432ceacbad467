"""A GPU worker's CPUs: those of its device's NUMA node.

On a host with several sockets, each GPU hangs off one of them. A worker whose threads run on the
other socket sends every launch, every host-side copy and the first touch of its output slabs
(which places their pages) across the socket link. So a worker on a CUDA device keeps to the CPUs
that the kernel lists as local to the device's PCI address (`local_cpulist` in sysfs), within the
CPUs it may use at all (a container's cpuset). Where any of that cannot be read (a CPU worker, a
virtual machine without NUMA, an older torch), nothing changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SYSFS_PCI = Path("/sys/bus/pci/devices")


def parse_cpulist(text: str) -> set[int]:
    """The kernel's CPU list format: "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def local_cpus(pci_address: str, sysfs: Path = SYSFS_PCI) -> set[int]:
    """CPUs local to the PCI device at `pci_address` ("0000:1b:00.0"); empty when unknown."""
    try:
        return parse_cpulist((sysfs / pci_address.lower() / "local_cpulist").read_text())
    except (OSError, ValueError):
        return set()


def cuda_pci_address(device: str) -> str | None:
    import torch

    properties = torch.cuda.get_device_properties(device)
    bus = getattr(properties, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(properties, 'pci_domain_id', 0):04x}:{bus:02x}:{getattr(properties, 'pci_device_id', 0):02x}.0"


def keep_to_device_node(device: str, sysfs: Path = SYSFS_PCI) -> set[int] | None:
    """Restrict this process to the CPUs local to `device` (a CUDA device); the CPUs kept, or None
    when nothing changed."""
    if not device.startswith("cuda"):
        return None
    try:
        address = cuda_pci_address(device)
    except Exception:  # no such device (said later, when the model loads), or no properties
        return None
    allowed = os.sched_getaffinity(0)
    local = local_cpus(address, sysfs) & allowed if address else set()
    if not local or local == allowed:
        return None
    set_process_affinity(local)
    log.info("kept to the %d CPUs local to %s (%s)", len(local), device, address)
    return local


def set_process_affinity(cpus: set[int], tasks: Path = Path("/proc/self/task")) -> None:
    """Keep every thread of this process to `cpus`. sched_setaffinity moves one thread, and reading
    the device's address has already started CUDA's threads: each of them is moved too (threads
    started later inherit the main thread's CPUs)."""
    os.sched_setaffinity(0, cpus)
    try:
        threads = [int(name) for name in os.listdir(tasks)]
    except OSError:
        return
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except OSError:  # it has ended meanwhile
            pass
