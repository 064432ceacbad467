"""Analytic FLOPs of the vision towers (2 FLOPs per multiply-add): what a request needs at least."""

from __future__ import annotations

from typing import Sequence

from vitserve.models.glm4v.config import Glm4vVisionConfig
from vitserve.models.qwen3_vl.config import Qwen3VLVisionConfig


def tower_flops(config: Qwen3VLVisionConfig | Glm4vVisionConfig, grids: Sequence[tuple[int, int, int]]) -> float:
    """Useful (unpadded) FLOPs of encoding items with these grids."""
    d, out = config.hidden_size, config.out_hidden_size
    merge_rows = config.spatial_merge_size**2
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    if isinstance(config, Glm4vVisionConfig):
        block = 4 * d * d + 3 * d * out  # qkv and proj; a SwiGLU out_hidden_size wide
        # the 2x2 conv, then the merger's projection and its SwiGLU intermediate_size wide
        per_merged_token = 2 * (merge_rows * d * out + out * out + 3 * out * config.intermediate_size)
    else:
        block = 4 * d * d + 2 * d * config.intermediate_size
        merged = d * merge_rows
        per_merged_token = (1 + len(config.deepstack_visual_indexes)) * 2 * (merged * merged + merged * out)
    per_token = 2 * patch_dim * d + config.depth * 2 * block
    total = 0.0
    for t, h, w in grids:
        tokens = t * h * w
        segment = h * w  # each temporal patch attends within itself
        attention = config.depth * 4 * segment * d  # QK^T and PV, per token
        total += tokens * (per_token + attention) + tokens / merge_rows * per_merged_token
    return total
