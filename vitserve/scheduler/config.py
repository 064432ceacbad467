"""What the scheduler's user sets: the flush policy, its margins and the queue's bounds."""

from __future__ import annotations

from dataclasses import dataclass

# deadline: ours (full, deadline pressure, or a worker about to idle). immediate: a window
# leaves as soon as a worker can take it. max_delay: Triton's dynamic batcher, which waits up
# to max_delay_ms for a full window. The last two exist to be compared against in benchmarks.
POLICIES = ("deadline", "immediate", "max_delay")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "deadline"
    margin_ms: float = 2.0  # slack kept between a window's predicted finish and its earliest deadline,
    margin_fraction: float = 0.1  # plus this fraction of the prediction
    learn_costs: bool = True  # scale each worker's cost model by its observed service times
    max_delay_ms: float = 5.0  # max_delay policy: how long the oldest item may wait for a fuller window
    in_flight_per_worker: int = 2  # windows queued on a worker, so its GPU never waits for the host
    idle_lead_ms: float = 1.0  # dispatch this long before a worker is predicted to run dry
    max_queued_items: int = 4096
    max_queued_tokens: int = 4 * 1024 * 1024
    fail_early: bool = True  # answer deadline_exceeded as soon as a deadline cannot be met
    lookahead: int = 64  # queued items scanned past the first that does not fit a window

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler policy {self.policy!r} is unknown; choose one of {list(POLICIES)}")
        if (not isinstance(self.margin_fraction, (int, float)) or isinstance(self.margin_fraction, bool)
                or not 0 <= self.margin_fraction <= 10):
            raise ValueError(f"margin_fraction must be a number from 0 to 10, got {self.margin_fraction!r}")
        for name in ("margin_ms", "max_delay_ms", "idle_lead_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number of milliseconds >= 0, got {value!r}")
        for name in ("in_flight_per_worker", "max_queued_items", "max_queued_tokens", "lookahead"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
