"""A window whose device work is queued in the worker, its reply once done, what a CUDA error
means, and when the worker's loop sleeps between its checks.

The worker queues a window's work and goes on; `Running` tells whether it has finished (without
waiting) and builds its reply: where each item's rows start, and how long the device was busy with
it, from CUDA timing events (the part overlapping the window before is counted once). `Pauses`
says how long the loop may sleep before it checks again: not at all near a window's predicted end
and just after its last reply (busy polling: engine/busy_poll.py says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vitserve.ipc.worker_messages import FromWorker, ProbeDone, WindowDone, WindowFailed

from .runner import EncodeResult


# Polling starts this share of busy_poll_ms before a reply (or a window's end) is predicted, in the
# engine and in the worker alike.
POLL_LEAD_SHARE = 0.25


class LearnedDue:
    """When a message is due: its prediction times a low quantile of the ratios of actual to
    predicted times seen lately, so that polling begins in time even where the predictions are off
    (e.g. a cost model measured while another process shared the device) and for most of the
    messages that come early. (A moving average that follows a shorter time ten times faster than a
    longer one settles near the tenth percentile.)"""

    RATES = (0.3, 0.03)  # weight of an observation below the ratio, and of one above it
    BOUNDS = (0.25, 4.0)

    def __init__(self):
        self.ratio = 1.0

    def due(self, start: float, predicted_s: float) -> float:
        return start + predicted_s * self.ratio

    def learn(self, start: float, predicted_s: float, end: float) -> None:
        if predicted_s > 0:
            sample = min(max((end - start) / predicted_s, self.BOUNDS[0]), self.BOUNDS[1])
            rate = self.RATES[1] if sample > self.ratio else self.RATES[0]
            self.ratio += rate * (sample - self.ratio)


class DeviceFault(Exception):
    """A CUDA error: the device context cannot be trusted for any later window."""


@dataclass
class Running:
    """A window whose device work is queued; its rows are valid once `result` is done."""

    window: int
    result: EncodeResult | None
    failure: str = ""
    received: float = 0.0  # time.perf_counter() when the window's message arrived
    sequence: int = 0  # its place among the windows started in this process (from 1)
    due: float = 0.0  # time.perf_counter() when its device work is predicted to end (Pauses.due)
    due_from: tuple[float, float] = (0.0, 0.0)  # (start, predicted seconds) that `due` came from
    # CUDA timing events: where the device reached the window's first work, the end of its copies,
    # and the end of the window before it (its busy time is counted once where the two overlap)
    began: torch.cuda.Event | None = None
    ended: torch.cuda.Event | None = None
    previous: torch.cuda.Event | None = None
    # stages: CUDA events where the inputs are preprocessed and where the last forward has been queued;
    # on the CPU, host milliseconds measured as the window ran (preprocess, output copies)
    prepared: torch.cuda.Event | None = None
    computed: torch.cuda.Event | None = None
    host_stages_ms: tuple[float, float] = (0.0, 0.0)

    def finished(self) -> bool:
        try:
            return self.result is None or self.result.done is None or self.result.done.query()
        except Exception as err:  # an asynchronous CUDA error can surface at the query too
            raise DeviceFault(f"window {self.window}: {type(err).__name__}: {err}") from err

    def reply(self) -> FromWorker:
        if self.result is None:
            return WindowFailed(self.window, self.failure)
        try:
            self.result.wait()
        except Exception as err:  # an asynchronous CUDA error surfaces here
            raise DeviceFault(f"window {self.window}: {type(err).__name__}: {err}") from err
        gpu_ms = 0.0
        preprocess_ms, transfer_ms = self.host_stages_ms
        if self.ended is not None:
            self.ended.synchronize()  # recorded just after the copies' barrier: done with them
            gpu_ms = self.began.elapsed_time(self.ended)
            if self.previous is not None:  # the part of the window before's copies that ran alongside
                gpu_ms -= max(0.0, min(self.began.elapsed_time(self.previous), gpu_ms))
            # (`computed` was recorded on the compute stream after the copies' barrier: the copy stream did
            # not wait for it, so it may not count as done yet; it has nothing to wait for)
            self.computed.synchronize()
            preprocess_ms = self.began.elapsed_time(self.prepared)
            transfer_ms = max(0.0, self.computed.elapsed_time(self.ended))  # the copies' tail after the forward
        return WindowDone(self.window, [item.offset for item in self.result.items],
                          (time.perf_counter() - self.received) * 1e3, gpu_ms, self.result.runs,
                          preprocess_ms, transfer_ms)


@dataclass
class Probing:
    """A readiness probe's forward, queued on the device like a window (answered in the same order)."""

    probe: int
    done: torch.cuda.Event | None  # None: already complete (the CPU), or it failed (`problem`)
    received: float
    sequence: int  # the next window's: input slabs dropped before it may go once this is answered
    problem: str = ""
    due: float = 0.0  # time.perf_counter() when its forward is predicted to end (Pauses.due)
    due_from: tuple[float, float] = (0.0, 0.0)  # (start, predicted seconds) that `due` came from

    def finished(self) -> bool:
        try:
            return self.done is None or self.done.query()
        except Exception as err:
            raise DeviceFault(f"readiness probe: {type(err).__name__}: {err}") from err

    def reply(self) -> ProbeDone:
        if self.done is not None:
            try:
                self.done.synchronize()
            except Exception as err:
                raise DeviceFault(f"readiness probe: {type(err).__name__}: {err}") from err
        return ProbeDone(self.probe, (time.perf_counter() - self.received) * 1e3, self.problem)


class Pauses:
    """How long the worker's loop sleeps before it checks again for a new window and for the
    oldest one's end: `sleep_s`, except while a message is expected soon. Then it polls without
    sleeping: from POLL_LEAD_SHARE of `busy_poll_s` before the oldest window's predicted end until
    `busy_poll_s` after it (past that, the prediction was wrong), and for `busy_poll_s` after its
    last reply (a sequential client's next window). `busy_poll_s` 0: always sleep. The engine's
    predictions are corrected by what the worker's windows took (LearnedDue)."""

    def __init__(self, busy_poll_s: float, sleep_s: float):
        self.busy_poll_s, self.sleep_s = busy_poll_s, sleep_s
        self._idle_until = 0.0
        self._learned = LearnedDue()

    def due(self, run: Running | Probing, predicted_ms: float, running) -> Running | Probing:
        """`run` with its predicted end: `predicted_ms` (corrected) after its receipt, or after the
        windows queued before it (`running`) if they end later."""
        run.due_from = (max(run.received, running[-1].due if running else 0.0), predicted_ms / 1e3)
        run.due = self._learned.due(*run.due_from)
        return run

    def finished(self, run: Running | Probing) -> None:
        """`run`'s work was found done now: what it took corrects the next predictions."""
        self._learned.learn(*run.due_from, time.perf_counter())

    def running(self, due: float) -> float:
        """Seconds to sleep while the oldest window, predicted to end at `due`, runs."""
        if self.busy_poll_s <= 0:
            return self.sleep_s
        now = time.perf_counter()
        begin = due - POLL_LEAD_SHARE * self.busy_poll_s
        if now < begin:
            return min(self.sleep_s, begin - now)
        return 0.0 if now < due + self.busy_poll_s else self.sleep_s

    def idle(self) -> None:
        """The last running window has been answered."""
        self._idle_until = time.perf_counter() + self.busy_poll_s

    def idle_polling(self) -> bool:
        """Whether the idle loop still polls for the next window instead of blocking."""
        return time.perf_counter() < self._idle_until


def is_cuda_error(err: BaseException) -> bool:
    """Whether `err` comes from the CUDA runtime (sticky: every later call on the context fails too)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(err, accelerator_error)) or "CUDA error" in str(err)
