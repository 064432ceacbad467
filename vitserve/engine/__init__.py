"""The engine: worker processes, the scheduler loop and request life cycles (embedded API),
and the ZeroMQ frontend that serves them to clients."""

from .admission import AdmissionError, AdmittedItem, admit
from .config import EngineConfig
from .engine import Engine
from .errors import EngineError

__all__ = ["AdmissionError", "AdmittedItem", "Engine", "EngineConfig", "EngineError", "admit"]
