"""How long a message takes to reach a process blocked on a Unix socket, against one that polls for
it, after the sender was idle for a while: the cost of a wake-up on this host (what
EngineConfig.busy_poll_ms saves; docs/benchmarks.md). A forked sender sleeps `gap`, then sends its
clock; the receiver notes when the message arrived. Also: how far a 100 µs sleep overruns.

    python3 tools/wake_latency.py
"""

from __future__ import annotations

import os
import socket
import statistics
import time

SAMPLES = 200
GAPS_S = (0.0001, 0.001, 0.004)  # the sender's idle time before each message


def one_way_us(gap_s: float, polling: bool) -> list[float]:
    """Microseconds from the send to the receipt of SAMPLES messages, each after `gap_s` of idling."""
    receiver, sender = socket.socketpair()
    child = os.fork()
    if child == 0:
        receiver.close()
        for _ in range(SAMPLES):
            sender.recv(1)  # go
            time.sleep(gap_s)
            sender.send(repr(time.perf_counter()).encode().ljust(32))
        os._exit(0)
    sender.close()
    latencies = []
    receiver.setblocking(not polling)
    for _ in range(SAMPLES):
        receiver.send(b"g")
        while True:
            try:
                sent = float(receiver.recv(32))
                break
            except BlockingIOError:  # polling: nothing yet
                continue
        latencies.append((time.perf_counter() - sent) * 1e6)
    os.waitpid(child, 0)
    receiver.close()
    return latencies


def sleep_overrun_us(sleep_s: float = 100e-6) -> float:
    overruns = []
    for _ in range(SAMPLES):
        began = time.perf_counter()
        time.sleep(sleep_s)
        overruns.append((time.perf_counter() - began - sleep_s) * 1e6)
    return statistics.median(overruns)


def main() -> None:
    print(f"{'sender idle':>12} {'receiver':>9} {'p50 µs':>8} {'p90 µs':>8}")
    for gap_s in GAPS_S:
        for polling in (False, True):
            latencies = sorted(one_way_us(gap_s, polling))
            p50, p90 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.9)]
            print(f"{gap_s * 1e3:>9.1f} ms {'polls' if polling else 'blocks':>9} {p50:>8.1f} {p90:>8.1f}")
    print(f"time.sleep(100 µs) overruns by {sleep_overrun_us():.1f} µs (median)")


if __name__ == "__main__":
    main()
