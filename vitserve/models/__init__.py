"""Vision towers: the encoder protocol, Qwen3-VL, weight loading and presets."""

from .attention import BACKENDS as ATTENTION_BACKENDS
from .loading import CheckpointError, load_model
from .presets import PRESETS
from .protocol import (
    EncoderGeometry,
    EncoderOutput,
    PackedLayout,
    VisionEncoder,
    check_patches,
    grid_list,
    pack_grids,
)
from .qwen3_vl.config import Qwen3VLVisionConfig
from .qwen3_vl.model import Qwen3VLVisionTower

__all__ = [
    "ATTENTION_BACKENDS",
    "CheckpointError",
    "EncoderGeometry",
    "EncoderOutput",
    "PRESETS",
    "PackedLayout",
    "Qwen3VLVisionConfig",
    "Qwen3VLVisionTower",
    "VisionEncoder",
    "check_patches",
    "grid_list",
    "load_model",
    "pack_grids",
]
