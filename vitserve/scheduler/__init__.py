"""The scheduler: a bounded queue ordered by priority and deadline, budget windows formed
against the runner's capacities, deadline-aware flushing and dispatch to workers."""

from .config import POLICIES, SchedulerConfig
from .queue import QueuedItem, Request, RequestQueue, deadline_at
from .scheduler import Scheduler
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
