"""Kimi K2.5 (MoonViT-3D) vision tower and projector configuration, read from Hugging Face config dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..hf_config import axial_rope_theta, check_activation, check_positive_ints, hf_fields

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class KimiK25VisionConfig:
    """Hugging Face's `Kimi_K25VisionConfig` fields the tower uses (its class defaults: Kimi K2.5 and
    K2.6), and of the whole model's config what the projector needs: its LayerNorm and the text
    model's width, which its rows are (`out_hidden_size`)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4  # frames of one chunk: they attend together and are averaged into one set of rows
    merge_size: int = 2  # Hugging Face's merge_kernel_size (2, 2)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    projection_layer_norm_eps: float = 1e-5
    out_hidden_size: int = 7168  # the text model's hidden size (DeepSeek-V3's)
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_positive_ints(self, ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                   "pos_emb_height", "pos_emb_width", "pos_emb_time", "merge_size", "out_hidden_size",
                                   "in_channels"))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision config: hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                             f"whole head dim that is a multiple of 4 (for the 2D rotary embedding)")
        if self.hidden_size % 2:
            raise ValueError(f"vision config: hidden_size {self.hidden_size} must be even (the sin-cos time table)")
        if self.pos_emb_height != self.pos_emb_width:
            raise ValueError(f"vision config: the position table must be square, got "
                             f"{self.pos_emb_height}x{self.pos_emb_width}")
        check_activation(self.hidden_act, SUPPORTED_ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, vision: dict[str, Any], whole: dict[str, Any] | None = None) -> "KimiK25VisionConfig":
        """From a Hugging Face `vision_config` dict and the whole model's config (projector, text width)."""
        known = hf_fields(cls, vision)
        kernel = vision.get("merge_kernel_size", (2, 2))
        if not isinstance(kernel, (list, tuple)) or len(kernel) != 2 or kernel[0] != kernel[1]:
            raise ValueError(f"vision config: merge_kernel_size {kernel!r} must be a square [n, n]")
        known["merge_size"] = kernel[0]
        whole = whole or {}
        text = whole.get("text_config") or {}
        projection = whole.get("projection_hidden_size", known.get("hidden_size", cls.hidden_size))
        if projection != known.get("hidden_size", cls.hidden_size):
            raise ValueError(f"projection_hidden_size {projection} must equal the vision hidden_size (the projector "
                             f"normalises each patch before the merge)")
        extra = {}
        if "hidden_size" in text:
            extra["out_hidden_size"] = text["hidden_size"]
        if "projection_layer_norm_eps" in whole:
            extra["projection_layer_norm_eps"] = whole["projection_layer_norm_eps"]
        return cls(**known, **extra, rope_theta=axial_rope_theta(vision, cls.rope_theta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
