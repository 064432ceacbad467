"""GLM-4.1V / 4.5V / 4.6V vision tower configuration, read from Hugging Face config dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..hf_config import axial_rope_theta, check_activation, check_positive_ints, hf_fields

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class Glm4vVisionConfig:
    """Hugging Face's `Glm4vVisionConfig` fields the tower uses; defaults are its class defaults
    (GLM-4.1V-9B). Naming trap kept from the reference: the blocks' SwiGLU is `out_hidden_size`
    wide, and `intermediate_size` is the width of the merger's SwiGLU."""

    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336  # the learned position table is (image_size / patch_size)² rows
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("depth", "hidden_size", "num_heads", "out_hidden_size", "intermediate_size",
                                   "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "image_size"))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision config: hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                             f"whole head dim that is a multiple of 4 (for the 2D rotary embedding)")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision config: image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size} (the position table is one row per patch of it)")
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"vision config: attention_bias must be true or false, got {self.attention_bias!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"vision config: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        check_activation(self.hidden_act, SUPPORTED_ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, vision: dict[str, Any]) -> "Glm4vVisionConfig":
        """Build from a Hugging Face `vision_config` dict."""
        return cls(**hf_fields(cls, vision), rope_theta=axial_rope_theta(vision, cls.rope_theta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
