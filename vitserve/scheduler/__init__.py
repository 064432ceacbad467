"""The scheduler: a bounded queue ordered by priority and deadline, budget windows formed
against the runner's capacities, deadline-aware flushing and dispatch to workers."""

from .config import POLICIES, SchedulerConfig
from .queue import QueuedItem, Request, RequestQueue
from .scheduler import Scheduler, deadline_at
from .state import Dispatch, Failure, Predictor, WorkerState

__all__ = [
    "POLICIES",
    "Dispatch",
    "Failure",
    "Predictor",
    "QueuedItem",
    "Request",
    "RequestQueue",
    "Scheduler",
    "SchedulerConfig",
    "WorkerState",
    "deadline_at",
]
