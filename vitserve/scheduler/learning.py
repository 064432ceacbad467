"""What a worker's completions teach the scheduler about its predictions.

The cost model is measured at capture on patches already on the device; serving adds
preprocessing, messages and host work. Two figures per worker correct for that:

- its scale, observed over modelled time of windows that queued behind another (timed from the
  previous completion to theirs: processing alone, preprocessing included);
- its overhead, what a window sent to an idle worker takes beyond that (messages, uploads,
  host work before the device starts).

Both are moving averages, so the scheduler follows a worker that slows down (a hotter GPU, a
busier host) without trusting any single window.
"""

from __future__ import annotations

LEARNING_RATE = 0.1  # weight of each completed window in a worker's scale and overhead
SCALE_BOUNDS = (0.5, 4.0)  # a scale outside these means a broken cost model, not noise
MAX_OVERHEAD_MS = 1000.0


def learn_from_completion(worker, modelled_ms: float, sent_at: float, queued: bool, now: float) -> None:
    """Update `worker.scale` and `worker.overhead_ms` from a window completed at `now` (seconds);
    `queued`: another window was in flight on the worker when this one was sent."""
    if modelled_ms <= 0:
        return
    if queued and worker.last_done > sent_at:  # it waited for the previous window: processing alone
        ratio = (now - worker.last_done) * 1e3 / modelled_ms
        worker.scale += LEARNING_RATE * (min(max(ratio, SCALE_BOUNDS[0]), SCALE_BOUNDS[1]) - worker.scale)
    else:  # sent to an idle worker: its latency is the overhead plus the processing
        extra = (now - sent_at) * 1e3 - modelled_ms * worker.scale
        worker.overhead_ms += LEARNING_RATE * (min(max(extra, 0.0), MAX_OVERHEAD_MS) - worker.overhead_ms)
