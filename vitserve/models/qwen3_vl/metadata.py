"""Qwen3-VL's position taps: bilinear on its learned 48x48 table, as Hugging Face transformers
>= 5.15 computes them (closed-form align_corners coordinates, float32 weights). The rest of a
window's metadata is shared (models/token_metadata.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..token_metadata import TokenMetadata, build_token_metadata
from .config import Qwen3VLVisionConfig


def qwen3_vl_metadata(
    config: Qwen3VLVisionConfig,
    layout: torch.Tensor,
    num_tokens: int,
    num_sequences: int,
    max_seqlen: int,
    segment_lengths: Sequence[int] | None = None,
) -> TokenMetadata:
    side = config.position_grid_side
    return build_token_metadata(
        layout, num_tokens, num_sequences, max_seqlen, segment_lengths, merge=config.spatial_merge_size,
        head_dim=config.head_dim, rope_theta=config.rope_theta,
        position_taps=lambda row, col, height, width: bilinear_taps(row, col, height, width, side),
    )


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps on one axis, align_corners=True: index 0 -> 0 and size-1 -> side-1."""
    source = index.to(torch.float32) * (side - 1) / (size - 1).clamp(min=1)  # (tokens,)
    floor = source.floor()
    offsets = torch.arange(2, device=index.device)  # floor and floor + 1; a kernel, not an H2D copy
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)  # (tokens, 2)
    distance = (source[:, None] - floor[:, None] - offsets).abs()
    return taps, (1 - distance).clamp(min=0)  # (tokens, 2) each


def bilinear_taps(
    row: torch.Tensor, col: torch.Tensor, height: torch.Tensor, width: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    row_taps, row_weights = _axis_taps(row, height, side)
    col_taps, col_weights = _axis_taps(col, width, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)  # (tokens, 4)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)  # (tokens, 4)
    return index, weight
