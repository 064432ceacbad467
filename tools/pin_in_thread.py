"""Does page-locking a large shared-memory mapping hold up the device work queued meanwhile?

A worker page-locks (cudaHostRegister) every input slab it maps: the engine's own at start-up and
each new local client's arena, 0.5 GiB by default, which took 0.33 to 0.67 s on the H200, inside
the worker's serving loop. Moving it to a helper thread helps only if the driver lets the main
thread launch and finish work meanwhile. This measures it: the main thread runs a steady stream of
short device steps (a bfloat16 matmul and a synchronize each) and reports the longest step and
the 99th percentile while nothing else happens, around a registration on the main thread itself,
and while a helper thread registers (then unregisters) a fresh mapping of the same size.

    python3 tools/pin_in_thread.py --gib 0.5
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vitserve.ipc.input_slabs import InputSlab, input_slab_name  # noqa: E402
from vitserve.workers.worker_inputs import pin_for_cuda, unpin_for_cuda  # noqa: E402


def fresh_slab(size: int) -> InputSlab:
    """Shared memory as the engine makes its input slabs (pages not yet touched)."""
    return InputSlab.create(input_slab_name(os.getpid(), "probe", next(_serials)), size)


_serials = itertools.count()


def register(mapping: mmap.mmap) -> float:
    """Seconds to page-lock `mapping` as a worker does its input slabs."""
    began = time.perf_counter()
    pin_for_cuda(mapping)
    return time.perf_counter() - began


def unregister(mapping: mmap.mmap) -> float:
    began = time.perf_counter()
    unpin_for_cuda(mapping)
    return time.perf_counter() - began


def steps(until, a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Milliseconds per device step (launch, then wait for it) while `until()` is False."""
    times = []
    while not until():
        began = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return times


def summary(label: str, times: list[float], extra: str = "") -> str:
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return (f"{label:<34} steps {len(times):5d}  p50 {statistics.median(times):7.3f} ms  p99 {p99:7.3f} ms  "
            f"max {times[-1]:8.1f} ms  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=0.5, help="size of each mapping registered")
    parser.add_argument("--side", type=int, default=2048, help="the matmul's side (one step's work)")
    args = parser.parse_args()
    size = int(args.gib * 2**30) // mmap.PAGESIZE * mmap.PAGESIZE
    a = torch.randn(args.side, args.side, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(50):
        torch.mm(a, b)
    torch.cuda.synchronize()

    stop = time.perf_counter() + 1.0
    print(summary("nothing else", steps(lambda: time.perf_counter() > stop, a, b)))

    slab = fresh_slab(size)
    took = []
    stop = time.perf_counter() + 0.2
    times = steps(lambda: time.perf_counter() > stop, a, b)
    began = time.perf_counter()
    took.append(register(slab.mapping))
    times.append((time.perf_counter() - began) * 1e3)  # the step that could not run meanwhile
    stop = time.perf_counter() + 0.2
    times += steps(lambda: time.perf_counter() > stop, a, b)
    print(summary("register on the main thread", times, f"register {took[0] * 1e3:.0f} ms"))
    unregister(slab.mapping)
    slab.close()

    slab = fresh_slab(size)
    done = threading.Event()
    helper_took: dict[str, float] = {}

    failed: list[BaseException] = []

    def helper() -> None:
        try:
            torch.cuda.set_device(a.device)  # (a new thread's current device is device 0)
            helper_took["register"] = register(slab.mapping)
            helper_took["unregister"] = unregister(slab.mapping)
        except BaseException as error:  # said after the join: the main thread's loop must end either way
            failed.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=helper)
    thread.start()
    times = steps(done.is_set, a, b)
    thread.join()
    slab.close()
    if failed:
        raise failed[0]
    print(summary("register + unregister in a thread", times,
                  f"register {helper_took['register'] * 1e3:.0f} ms, unregister {helper_took['unregister'] * 1e3:.0f} ms"))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("pin_in_thread.py needs a CUDA device")
    main()
