"""Window formation and deadline-aware flushing.

The scheduler is pure bookkeeping on an explicit clock: the engine calls `submit`, `poll`
and `window_done` with `now`, sends the windows `poll` returns, and wakes `poll` again at
`wakeup` (or on the next event). Nothing here sleeps or does I/O, so every rule is tested
with a fake clock and a fake cost model.

A window is formed from the head of the queue (priority, then earliest deadline) against
the budget, item and sequence capacities. Under the `deadline` policy it leaves when

- it is full (a queued item no longer fits), or
- waiting longer would miss its earliest deadline: start + predicted + margin >= deadline,
  where start is when its worker frees up, or
- its worker would otherwise run dry (predicted busy time ends within `idle_lead_ms`);

and it goes to the worker that is predicted to finish it first. Waiting while the workers
are busy is what makes windows large; the deadline and idle rules bound what it costs.

Predictions are the cost model times each worker's learned scale, plus its learned overhead
for a worker that is idle (learning.py); windows for a busy worker leave early enough to hide
the overhead. The margin is `margin_ms` plus `margin_fraction` of the prediction, as errors
grow with the window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from vitserve.workers import Capacities

from .config import SchedulerConfig
from .doomed import DoomClock
from .forming import form_window
from .learning import learn_from_completion
from .queue import QueuedItem, Request, RequestQueue
from .state import Candidate, Dispatch, Failure, Predictor, WorkerState

MAX_REMEMBERED_SHAPES = 4096  # item shapes whose predicted time is kept

class Scheduler:
    def __init__(self, config: SchedulerConfig, capacities: Capacities, workers: list[WorkerState]):
        self.config = config
        self.capacities = capacities
        self.workers = {worker.id: worker for worker in workers}
        self.queue = RequestQueue()
        self._doom = DoomClock()  # when queued requests become hopeless (fail_early)
        self.wakeup: float | None = None  # when `poll` should run again if nothing else happens
        self._window_ids = 0
        self._dispatched: dict[int, Dispatch] = {}
        self._modelled_ms: dict[tuple[int, int, int], list[float]] = {}  # item shape -> model ms per worker
        self._sent_at: dict[int, tuple[float, bool]] = {}  # window id -> (dispatch time, queued behind another)
        # An item predicted to take longer than this alone would be taken for a stuck worker (the
        # engine sets it from its window watchdog): refused at once instead of killing workers.
        self.max_item_ms = math.inf

    def use_policy(self, policy: str, max_delay_ms: float | None = None) -> None:
        """Switch the flush policy of a live scheduler (benchmarks compare policies on one engine)."""
        changes = {"policy": policy} if max_delay_ms is None else {"policy": policy, "max_delay_ms": max_delay_ms}
        self.config = dataclasses.replace(self.config, **changes)

    # -- events ------------------------------------------------------------------------------
    def submit(self, request: Request, now: float) -> Failure | None:
        """Queue a request's items, or say why not."""
        tokens = sum(t for t, _ in request.shapes)
        config = self.config
        if not request.shapes:
            return Failure(request, "invalid_input", "a request needs at least one item")
        if len(request.shapes) > config.max_queued_items or tokens > config.max_queued_tokens:
            return Failure(request, "too_large",
                           f"the request alone ({len(request.shapes)} items, {tokens} tokens) exceeds the queue's "
                           f"limits ({config.max_queued_items} items, {config.max_queued_tokens} tokens): split it")
        if (len(self.queue) + len(request.shapes) > config.max_queued_items
                or self.queue.tokens + tokens > config.max_queued_tokens):
            return Failure(request, "overloaded",
                           f"the queue is full ({len(self.queue)} items, {self.queue.tokens} tokens queued; "
                           f"limits {config.max_queued_items} items, {config.max_queued_tokens} tokens)",
                           retry_after_ms=self.drain_ms(now))
        alone_ms = [self._fastest(tokens, sequences, tokens * tokens // sequences) for tokens, sequences in request.shapes]
        slowest = max(range(len(alone_ms)), key=alone_ms.__getitem__)
        if alone_ms[slowest] > self.max_item_ms:
            return Failure(request, "too_large",
                           f"item {slowest} is predicted to take {alone_ms[slowest] / 1e3:.1f} s even alone, longer "
                           f"than the engine lets a window run ({self.max_item_ms / 1e3:.1f} s, half of "
                           f"window_timeout_s): send a smaller item or fewer frames, or raise window_timeout_s")
        items = self.queue.add(request)
        for item, ms in zip(items, alone_ms):
            item.alone_ms = ms
        if config.fail_early and self._hopeless(items, now):
            self.queue.remove(items)
            return self._deadline_failure(request, now)
        self._doom.watch(items)
        return None

    def cancel(self, key: int) -> bool:
        """Drop a request's queued items; True when any were queued."""
        items = self.queue.of_request(key)
        self.queue.remove(items)
        return bool(items)

    def window_done(self, window: int, now: float, learn: bool = True) -> Dispatch:
        """A window finished: free its worker's place, learn from its service time (unless it failed
        or was never sent: `learn=False`); returns what it held."""
        dispatch = self._dispatched.pop(window)
        worker = self.workers[dispatch.worker]
        worker.in_flight.pop(window, None)
        sent_at, queued = self._sent_at.pop(window)
        if learn and self.config.learn_costs:
            learn_from_completion(worker, dispatch.modelled_ms, sent_at, queued, now)
        if learn:
            worker.last_done = now
        worker.busy_until = now + sum(worker.in_flight.values()) / 1e3
        return dispatch

    def worker_lost(self, worker_id: int) -> list[Dispatch]:
        """A worker died: it takes nothing more; returns its in-flight windows (to retry or fail)."""
        worker = self.workers[worker_id]
        worker.ready = False
        lost = [self._dispatched.pop(window) for window in list(worker.in_flight)]
        for dispatch in lost:
            self._sent_at.pop(dispatch.window, None)
        worker.in_flight.clear()
        return lost

    def retry(self, items: Sequence[QueuedItem]) -> None:
        """Queue the items of a lost window again, ahead of later arrivals of their priority."""
        for item in items:
            item.lost += 1
        self.queue.put_back(items)
        self._doom.watch(items)

    def worker_back(self, worker_id: int, predict: Predictor, free_rows: int, now: float) -> None:
        """A restarted worker takes windows again; it keeps what was learned of its device."""
        worker = self.workers[worker_id]
        worker.predict, worker.free_rows, worker.busy_until = predict, free_rows, now
        worker.in_flight.clear()
        worker.ready, worker.suspect = True, False
        self._modelled_ms.clear()  # modelled per worker: its cost model was measured anew

    def worker_warm(self, worker_id: int, predict: Predictor) -> None:
        """A worker's final cost model, after it served on a provisional one while it warmed up:
        what was learned of its scale against the provisional one no longer applies."""
        worker = self.workers[worker_id]
        worker.predict, worker.scale = predict, 1.0
        self._modelled_ms.clear()

    # -- decisions ---------------------------------------------------------------------------
    def poll(self, now: float) -> tuple[list[Dispatch], list[Failure]]:
        """Windows to send now, and requests failed early; sets `wakeup`."""
        failures = self._fail_hopeless(now) if self.config.fail_early else []
        dispatches: list[Dispatch] = []
        self.wakeup = None
        while len(self.queue):
            candidate = self._form()
            if not candidate.items:
                break
            placed = self._place(candidate, now)
            if placed is None:
                break  # every worker is at its in-flight limit or out of slots: a completion will poll again
            worker, predicted, start = placed
            leave_at = self._leave_time(candidate, worker, predicted, start, now)
            if leave_at > now:
                self.wakeup = leave_at
                break
            dispatches.append(self._dispatch(candidate, worker, predicted, now))
        if self.config.fail_early and len(self.queue):  # wake up to fail what can no longer make it
            doomed_at = self._doom.next_at()
            if math.isfinite(doomed_at):
                self.wakeup = doomed_at if self.wakeup is None else min(self.wakeup, doomed_at)
        return dispatches, failures

    def stalled_on_memory(self) -> list[Request]:
        """Requests of the next window when no ready worker has room for its output rows and none has
        a window in flight that would give rows back: only releases of results can unblock them."""
        eligible = self._eligible()  # (a window in flight anywhere may prove a suspect worker or free rows)
        if not len(self.queue) or not eligible or any(w.in_flight for w in self.workers.values() if w.ready):
            return []
        window = self._form()
        if any(w.free_rows >= self._rows(window.rows, w) for w in eligible):
            return []
        return list({id(item.request): item.request for item in window.items}.values())

    def drain_ms(self, now: float) -> float:
        """Rough time for the ready workers to finish their windows and work off the queue: the
        retry hint of `overloaded`."""
        ready = [w for w in self.workers.values() if w.ready] or list(self.workers.values())
        budget = self.capacities.max_budget
        per_window = min(w.predicted_ms(budget, 1, budget * budget // 16) for w in ready)
        busy_ms = min(max(w.busy_until - now, 0.0) for w in ready) * 1e3
        return busy_ms + per_window * self.queue.tokens / budget / len(ready)

    def _form(self) -> Candidate:
        return form_window(self.queue, self.capacities, self.config.lookahead)

    def _place(self, window: Candidate, now: float) -> tuple[WorkerState, float, float] | None:
        """The worker predicted to finish the window first, its predicted ms and start time. Suspect
        workers (a readiness probe failed or is overdue) only while every worker up is suspect."""
        best = None
        for worker in self._eligible():
            if (worker.free_rows < self._rows(window.rows, worker)
                    or len(worker.in_flight) >= self.config.in_flight_per_worker):
                continue
            predicted = worker.predicted_ms(window.tokens, window.sequences, window.square_tokens)
            start = max(now + worker.overhead_ms / 1e3, worker.busy_until)
            if best is None or start + predicted / 1e3 < best[2] + best[1] / 1e3:
                best = (worker, predicted, start)
        return best

    def _eligible(self) -> list[WorkerState]:
        """The workers that may take windows: those up, less the suspect ones while any up is not."""
        ready = [w for w in self.workers.values() if w.ready]
        trusted = [w for w in ready if not w.suspect]
        return trusted or ready

    def _leave_time(self, window: Candidate, worker: WorkerState, predicted: float, start: float,
                    now: float) -> float:
        """When the window must leave under the policy (<= now: at once)."""
        config = self.config
        if config.policy == "immediate" or window.full:
            return now
        if config.policy == "max_delay":
            return min(item.request.arrival for item in window.items) + config.max_delay_ms / 1e3
        # deadline: waiting is free while the worker is busy and the deadline is far. Leaving at t
        # starts at max(t + overhead, busy_until) and finishes `predicted` later; the latest start
        # that keeps the margin, and the latest departure for it:
        overhead = worker.overhead_ms / 1e3
        latest_start = window.earliest_deadline() - (predicted * (1 + config.margin_fraction) + config.margin_ms) / 1e3
        deadline_bound = latest_start - overhead if latest_start >= start else now  # too late: go now
        idle_bound = worker.busy_until - overhead - config.idle_lead_ms / 1e3
        return min(deadline_bound, idle_bound)

    def _dispatch(self, window: Candidate, worker: WorkerState, predicted: float, now: float) -> Dispatch:
        self._window_ids += 1
        dispatch = Dispatch(self._window_ids, worker.id, window.items, window.tokens, predicted,
                            predicted / worker.scale)
        self._sent_at[dispatch.window] = (now, bool(worker.in_flight))
        self.queue.dispatched(window.items)
        worker.in_flight[dispatch.window] = predicted
        worker.free_rows -= self._rows(window.rows, worker)  # the engine keeps this count true
        worker.busy_until = max(now + worker.overhead_ms / 1e3, worker.busy_until) + predicted / 1e3
        self._dispatched[dispatch.window] = dispatch
        return dispatch

    # -- deadlines -----------------------------------------------------------------------------
    @staticmethod
    def _rows(rows: int, worker: WorkerState) -> int:
        """Output rows a window writing `rows` leases on `worker`, rounded up to whole slots."""
        grain = worker.row_granularity
        return -(-rows // grain) * grain

    def holds(self, window: int) -> bool:
        """Whether a window is dispatched and not yet done or lost."""
        return window in self._dispatched

    def _fastest(self, tokens: int, sequences: int, square_tokens: int) -> float:
        """Predicted ms of an item alone on the fastest ready worker, from now (an idle worker's)."""
        workers = list(self.workers.values())
        shape = (tokens, sequences, square_tokens)
        modelled = self._modelled_ms.get(shape)
        if modelled is None:  # traffic has few distinct item shapes: run the cost model once for each
            if len(self._modelled_ms) >= MAX_REMEMBERED_SHAPES:
                self._modelled_ms.clear()
            modelled = self._modelled_ms[shape] = [w.predict(tokens, sequences, square_tokens) for w in workers]
        ready = [(w, ms) for w, ms in zip(workers, modelled) if w.ready] or list(zip(workers, modelled))
        return min(ms * w.scale + w.overhead_ms for w, ms in ready)

    def _hopeless(self, items: list[QueuedItem], now: float) -> bool:
        return any(now >= item.request.deadline - item.alone_ms / 1e3 for item in items)

    def _fail_hopeless(self, now: float) -> list[Failure]:
        failures = []
        for request in self._doom.due(now, self.queue):
            self.cancel(request.key)
            failures.append(self._deadline_failure(request, now))
        return failures

    def _deadline_failure(self, request: Request, now: float) -> Failure:
        left_ms = (request.deadline - now) * 1e3
        return Failure(request, "deadline_exceeded",
                       f"the deadline cannot be met: {max(left_ms, 0.0):.1f} ms left, and encoding the request's "
                       f"items takes longer than that even alone on the fastest worker")

