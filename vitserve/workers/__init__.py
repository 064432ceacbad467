"""Worker side: windows, packing, CUDA-graph capture and replay, the model runner."""

from .capacities import Capacities, WindowConfig, resolve_capacities
from .cost_model import CostModel
from .graphs import CaptureReport
from .packing import ItemShape, Window, pack
from .runner import EncodeResult, ItemOutput, ModelRunner
from .stats import RunnerStats

__all__ = [
    "Capacities",
    "CaptureReport",
    "CostModel",
    "EncodeResult",
    "ItemOutput",
    "ItemShape",
    "ModelRunner",
    "RunnerStats",
    "Window",
    "WindowConfig",
    "pack",
    "resolve_capacities",
]
