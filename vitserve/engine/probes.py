"""Readiness probes: a worker counts as ready only while it shows that it runs forwards.

Heartbeats (liveness.py) show that a worker process is alive, but they come from a thread of their
own: a main thread stuck in a device call goes on beating. A completed window shows more: the
worker took it, ran its forward on the device and answered. A worker that has had no window for
`readiness_probe_s` gets a probe instead, a one-block forward queued behind its windows and
answered in order like one (workers/running.py, Probing). A probe unanswered for
`readiness_timeout_s`, one that failed, or a window still out `readiness_timeout_s` after its worker
should have finished everything sent to it (the predicted times of its windows in flight) makes the
worker suspect until it answers again: out of
readiness, with the reason in the health detail, and sent windows only while every worker up is
suspect (a stuck worker would hold them until the watchdog). A probe unanswered past
`window_timeout_s` means a stuck worker, killed and restarted as one with a stuck window is
(restarts.py). A worker has at most one probe out at a time, and none while windows run on it:
probes never pile up.

A mixin of `Engine` (engine.py), which owns the state used here.
"""

from __future__ import annotations

import asyncio
import time

from vitserve.ipc.worker_messages import Probe, ProbeDone


class ReadinessProbes:
    def _worker_proven(self, worker: int) -> None:
        """The worker answered a window or a probe (or has just started): proven as of now."""
        self._proven_at[worker] = time.monotonic()
        self._probe_failures.pop(worker, None)
        self._mark_suspect(worker, False)

    def _mark_suspect(self, worker: int, suspect: bool) -> None:
        """Tell the scheduler: a suspect worker gets windows only when no other can take them (a
        change can let queued windows go: the dispatch loop looks again)."""
        state = None if self.scheduler is None else self.scheduler.workers.get(worker)
        if state is not None and state.suspect != suspect:
            state.suspect = suspect
            self._poke.set()

    def _forget_probe(self, worker: int) -> None:
        """The worker was lost: its probe cannot be answered any more."""
        self._probes.pop(worker, None)
        self._probe_failures.pop(worker, None)

    async def _probe_loop(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(min(period_s, self.config.readiness_timeout_s) / 4)
            try:
                self._probe_step(period_s)
            except Exception as err:  # contained: the loop goes on (readiness must not freeze)
                self._internal_errors += 1
                self._log_limits.error("probe", "the readiness probes' step failed: %r", err, exc_info=True)

    def _probe_step(self, period_s: float) -> None:
        """Mark the suspect workers, and probe those idle for `period_s` that have no probe out."""
        now = time.monotonic()
        unproven = self._unproven()
        for worker in self.scheduler.workers:
            self._mark_suspect(worker, worker in unproven)
        for handle in list(self._handles):
            worker = handle.worker
            state = self.scheduler.workers[worker]
            if (not state.ready or state.in_flight or worker in self._probes
                    or now - self._proven_at.get(worker, now) < period_s):
                continue
            probe = next(self._probe_numbers)
            if not handle.send_now(Probe(probe)):
                self._worker_died(handle)  # the link is broken: the process is gone
                continue
            self._probes[worker] = (probe, now)
            self._probes_sent += 1

    def _probe_answered(self, worker: int, done: ProbeDone) -> None:
        out = self._probes.get(worker)
        if out is None or out[0] != done.probe:
            return  # not the probe this worker has out (it cannot happen within one epoch)
        del self._probes[worker]
        if not done.problem:
            self._worker_proven(worker)
            return
        self._probe_failures[worker] = done.problem
        self._mark_suspect(worker, True)
        self._log_limits.error("probe", "worker %d failed its readiness probe: %s", worker, done.problem)

    def _probe_sent_at(self, worker: int) -> float | None:
        """When the worker's unanswered probe went out (time.monotonic()), if one is out."""
        out = self._probes.get(worker)
        return None if out is None else out[1]

    def _unproven(self) -> dict[int, str]:
        """Workers that are up but failed, or have not answered in time, their readiness probe, or
        hold a window long past its predicted end: why."""
        if self.scheduler is None:  # starting: no worker is up yet
            return {}
        now, timeout = time.monotonic(), self.config.readiness_timeout_s
        unproven = {worker: f"worker {worker} failed its readiness probe ({problem})"
                    for worker, problem in self._probe_failures.items()}
        for worker, (_, sent) in self._probes.items():
            if now - sent > timeout:
                unproven[worker] = (f"worker {worker} has not answered its readiness probe for {now - sent:.1f} s "
                                    f"(readiness_timeout_s={timeout:g})")
        if self.config.readiness_probe_s is None:  # no probes: a worker is ready while its process beats
            return unproven
        loop_now = _loop_time()  # the clock of the windows' send times
        for worker, state in self.scheduler.workers.items():
            if not state.in_flight or worker in unproven:
                continue
            oldest = min((self._windows[w][2] for w in state.in_flight if w in self._windows), default=loop_now)
            late_s = loop_now - oldest - sum(state.in_flight.values()) / 1e3  # past the end of all it was sent
            if late_s > timeout:
                unproven[worker] = (f"worker {worker} has held a window {late_s:.1f} s past its predicted end "
                                    f"(readiness_timeout_s={timeout:g})")
        return unproven


def _loop_time() -> float:
    """The event loop's clock (windows' send times are on it); time.monotonic() outside a loop (the
    clock asyncio's and uvloop's loops read, for a caller on another thread)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
