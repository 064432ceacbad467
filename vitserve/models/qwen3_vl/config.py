"""Qwen3-VL vision tower configuration, read from Hugging Face config dicts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..hf_config import axial_rope_theta, check_activation, check_positive_ints, hf_fields

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class Qwen3VLVisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 3584  # Hugging Face's class default, used when a config omits it
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = field(default=(8, 16, 24))
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        check_positive_ints(self, ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                   "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels",
                                   "num_position_embeddings"))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision config: hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"vision config: head dim {self.head_dim} (hidden_size / num_heads) must be a multiple of 4 "
                "for the 2D rotary embedding"
            )
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"vision config: num_position_embeddings {self.num_position_embeddings} must be a perfect "
                "square (a side x side learned grid)"
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ValueError(
                f"vision config: deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must be "
                f"distinct block indexes in [0, {self.depth})"
            )
        check_activation(self.hidden_act, SUPPORTED_ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf(cls, vision: dict[str, Any]) -> "Qwen3VLVisionConfig":
        """Build from a Hugging Face `vision_config` dict (4.57 and 5.x spellings)."""
        return cls(**hf_fields(cls, vision), rope_theta=axial_rope_theta(vision, cls.rope_theta))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["deepstack_visual_indexes"] = list(self.deepstack_visual_indexes)
        return data
