"""Analytic FLOPs of the vision towers (2 FLOPs per multiply-add): what a request needs at least."""

from __future__ import annotations

from typing import Sequence

from vitserve.models.glm4v.config import Glm4vVisionConfig
from vitserve.models.kimi_k25.config import KimiK25VisionConfig
from vitserve.models.qwen3_vl.config import Qwen3VLVisionConfig


def tower_flops(config: Qwen3VLVisionConfig | Glm4vVisionConfig | KimiK25VisionConfig,
                grids: Sequence[tuple[int, int, int]]) -> float:
    """Useful (unpadded) FLOPs of encoding items with these grids."""
    if isinstance(config, KimiK25VisionConfig):
        return _kimi_flops(config, grids)
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


def _kimi_flops(config: KimiK25VisionConfig, grids: Sequence[tuple[int, int, int]]) -> float:
    """Kimi K2.5: a Conv2d per frame, chunks of up to pos_emb_time frames attending together, and the
    projector on each output row (a chunk's frames averaged into one)."""
    d, merged = config.hidden_size, config.hidden_size * config.merge_size**2
    per_token = 2 * config.in_channels * config.patch_size**2 * d + config.depth * 2 * (
        4 * d * d + 2 * d * config.intermediate_size)
    per_row = 2 * (merged * merged + merged * config.out_hidden_size)
    total = 0.0
    for t, h, w in grids:
        for start in range(0, t, config.pos_emb_time):
            segment = min(config.pos_emb_time, t - start) * h * w  # one chunk
            total += segment * (per_token + config.depth * 4 * segment * d) + h * w / config.merge_size**2 * per_row
    return total
