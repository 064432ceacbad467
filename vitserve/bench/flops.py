"""Analytic FLOPs of the Qwen3-VL vision tower (2 FLOPs per multiply-add)."""

from __future__ import annotations

from typing import Sequence

from vitserve.models import Qwen3VLVisionConfig


def tower_flops(config: Qwen3VLVisionConfig, grids: Sequence[tuple[int, int, int]]) -> float:
    """Useful (unpadded) FLOPs of encoding items with these grids."""
    d, inner, out = config.hidden_size, config.intermediate_size, config.out_hidden_size
    merged = d * config.spatial_merge_size**2
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    per_token = 2 * patch_dim * d + config.depth * 2 * (4 * d * d + 2 * d * inner)
    per_merged_token = (1 + len(config.deepstack_visual_indexes)) * 2 * (merged * merged + merged * out)
    total = 0.0
    for t, h, w in grids:
        tokens = t * h * w
        segment = h * w  # each temporal patch attends within itself
        attention = config.depth * 4 * segment * d  # QK^T and PV, per token
        total += tokens * (per_token + attention) + tokens / config.spatial_merge_size**2 * per_merged_token
    return total
