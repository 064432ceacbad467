"""A GPU worker keeps to the CPUs of its device's NUMA node (workers/placement.py): the kernel's CPU
lists are read as the kernel writes them, an unknown device changes nothing, and on the GPU machine
the CPUs kept are a subset of those allowed."""

from __future__ import annotations

import os

import pytest

from vitserve.workers.placement import keep_to_device_node, local_cpus, parse_cpulist, set_process_affinity


@pytest.mark.parametrize("text, cpus", [("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}), ("5", {5}), ("", set()),
                                        ("0-1,", {0, 1})])
def test_cpu_lists_read_as_the_kernel_writes_them(text, cpus):
    assert parse_cpulist(text) == cpus


def test_a_devices_local_cpus_come_from_its_pci_address(tmp_path):
    device = tmp_path / "0000:1b:00.0"
    device.mkdir()
    (device / "local_cpulist").write_text("0-23,48-71\n")
    assert local_cpus("0000:1B:00.0", tmp_path) == set(range(24)) | set(range(48, 72))
    assert local_cpus("0000:99:00.0", tmp_path) == set()  # no such device: unknown
    (device / "local_cpulist").write_text("garbage")
    assert local_cpus("0000:1b:00.0", tmp_path) == set()


def test_a_cpu_worker_keeps_every_cpu():
    before = os.sched_getaffinity(0)
    assert keep_to_device_node("cpu") is None and os.sched_getaffinity(0) == before


def test_every_thread_of_the_process_is_kept_not_only_the_caller():
    """CUDA's threads exist before the worker restricts itself: they are moved too."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:  # (a process of its own: affinity is per process)
        cpu, main, other = pool.apply(_restrict_with_a_thread_running)
    assert main == other == {cpu}


def _restrict_with_a_thread_running():
    import threading

    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), stop.wait()))
    thread.start()
    started.wait()
    cpu = min(os.sched_getaffinity(0))
    set_process_affinity({cpu})
    other = os.sched_getaffinity(thread.native_id)
    stop.set()
    thread.join()
    return cpu, os.sched_getaffinity(0), other


@pytest.mark.gpu
def test_a_gpu_worker_keeps_to_cpus_it_may_use():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:  # (a process of its own: affinity is per process)
        allowed, kept = pool.apply(_keep, ("cuda:0",))
    assert kept is None or (kept and kept <= allowed)


def _keep(device: str):
    allowed = os.sched_getaffinity(0)
    return allowed, keep_to_device_node(device)
