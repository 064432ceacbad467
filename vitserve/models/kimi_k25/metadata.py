"""Per-token metadata of a packed Kimi K2.5 window, derived on the device from its layout.

Against Qwen3-VL's (models/token_metadata.py): a frame's patches are stored in raster order; a video's
frames are cut into chunks of `pos_emb_time` (4) frames, each chunk one attention segment; each frame
of a chunk adds a sin-cos time row (none for a one-frame chunk); the rotary angles interleave the
column and the row per frequency; and each output slot gathers its tokens: the 2x2 merge takes rows r
and r + w of a frame, and a chunk's frames are averaged into one frame of output rows (`merge_source`,
`merge_weight`: a gather in a fixed order, so a window's sums do not depend on what else it holds, as
atomic adds' would). Static shapes, no host sync: it runs inside a captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..glm4v.positions import cubic_weights
from ..token_metadata import checked_lengths, segment_bounds
from .config import KimiK25VisionConfig


@dataclass(frozen=True)
class KimiMetadata:
    pos_index: torch.Tensor  # (tokens, 16) int64 rows of the 64x64 position table
    pos_weight: torch.Tensor  # (tokens, 16) float32 bicubic weights (0 for padding)
    time_index: torch.Tensor  # (tokens,) int64 row of the time table: 0 (none) or 1 + frame in its chunk
    rope_cos: torch.Tensor  # (tokens, 1, head_dim / 2) float32
    rope_sin: torch.Tensor  # (tokens, 1, head_dim / 2) float32
    # per output slot (output row * 4 + position in its 2x2 block): the token of each frame of its chunk
    merge_source: torch.Tensor  # (tokens, pool) int64 (unused frames and padding slots: a token weighted 0)
    merge_weight: torch.Tensor  # (tokens, pool) float32: 1 / frames of its chunk, 0 where unused
    cu_seqlens: torch.Tensor  # (sequences + 1,) int32 segment boundaries
    max_seqlen: int  # host upper bound of any segment length
    segment_lengths: tuple[int, ...] | None = None  # host copy of the lengths, when known


def kimi_metadata(
    config: KimiK25VisionConfig,
    layout: torch.Tensor,
    num_tokens: int,
    num_sequences: int,
    max_seqlen: int,
    segment_lengths: Sequence[int] | None = None,
) -> KimiMetadata:
    device, pool, merge = layout.device, config.pos_emb_time, config.merge_size
    t, h, w, token_offset, _ = layout.t().contiguous()  # each (items,)
    frame_tokens = (h * w).clamp(min=1)  # (items,)
    chunks = (t + pool - 1) // pool  # (items,)
    item_rows = chunks * (h * w // merge**2)  # (items,)
    row_offset = item_rows.cumsum(0) - item_rows  # (items,) where each item's rows start
    real_tokens = (t * h * w).sum()

    token = torch.arange(num_tokens, device=device)  # (tokens,)
    item = (torch.searchsorted(token_offset, token, right=True) - 1).clamp(min=0)  # (tokens,)
    is_real = token < real_tokens  # (tokens,)
    index = token - token_offset[item]
    frame, within = index // frame_tokens[item], index % frame_tokens[item]
    width = w[item]
    row, col = within // width * is_real, within % width * is_real  # raster; padding at (0, 0)
    chunk, frame_in_chunk = frame // pool, frame % pool
    chunk_frames = torch.minimum(t[item] - chunk * pool, torch.full_like(chunk, pool))  # (tokens,)
    time_index = torch.where(chunk_frames > 1, frame_in_chunk + 1, 0) * is_real

    pos_index, pos_weight = _bicubic_taps(row, col, h[item], width, config.pos_emb_height)
    pos_weight = pos_weight * is_real[:, None]
    rope_cos, rope_sin = _interleaved_rotary(row, col, config.head_dim, config.rope_theta)

    merged_width = width // merge
    output_row = row_offset[item] + chunk * (frame_tokens[item] // merge**2) + (row // merge) * merged_width + col // merge
    slot = output_row * merge**2 + (row % merge) * merge + col % merge  # (tokens,)
    merge_source, merge_weight = _merge_gather(slot, is_real & (frame_in_chunk == 0), chunk_frames,
                                               frame_tokens[item], pool)

    cu_seqlens = segment_bounds(layout, num_tokens, num_sequences, pool)
    return KimiMetadata(pos_index, pos_weight, time_index, rope_cos, rope_sin, merge_source, merge_weight, cu_seqlens,
                        max_seqlen, checked_lengths(segment_lengths, num_tokens, num_sequences))


def _merge_gather(slot, leads, chunk_frames, frame_tokens, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output slot, its chunk's tokens and their weights. A real slot is led by the token of its
    chunk's first frame; the same position of frame k is `frame_tokens * k` tokens on. A slot nothing
    leads (a padding row: real rows * 4 <= real tokens) gathers itself with weight 0, never a padding
    token into a real row: padding pixels are whatever an earlier window left, and inf * 0 is NaN."""
    num_tokens, device = slot.shape[0], slot.device
    token = torch.arange(num_tokens, device=device)
    target = torch.where(leads, slot, num_tokens)  # (tokens,) the slot each leader fills; others the spare entry
    first = torch.arange(num_tokens + 1, device=device).scatter_(0, target, token)[:num_tokens]  # (slots,)
    led = torch.zeros(num_tokens + 1, dtype=torch.bool, device=device).scatter_(0, target, leads)[:num_tokens]
    frames = torch.where(led, chunk_frames[first], 1)  # (slots,)
    frame = torch.arange(pool, device=device)
    used = led[:, None] & (frame < frames[:, None])  # (slots, pool)
    source = torch.where(used, first[:, None] + frame * frame_tokens[first][:, None], first[:, None])
    return source, used / frames[:, None].to(torch.float32)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic taps of F.interpolate(align_corners=False) on one axis: half-pixel centres, Keys' kernel
    with a = -0.75, taps clamped to the table (the reference's own arithmetic for the source position)."""
    source = (index.to(torch.float32) + 0.5) * side / size - 0.5  # (tokens,)
    floor = source.floor()
    offsets = torch.arange(-1, 3, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)  # (tokens, 4)
    return taps, cubic_weights(source - floor)  # (tokens, 4) each


def _bicubic_taps(row, col, height, width, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    row_taps, row_weights = _axis_taps(row, height, side)
    col_taps, col_weights = _axis_taps(col, width, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 16)  # (tokens, 16)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 16)  # (tokens, 16)
    return index, weight


def _interleaved_rotary(row: torch.Tensor, col: torch.Tensor, head_dim: int, theta: float):
    """Axial rotary whose half-dim table interleaves per frequency, column first:
    [col f0, row f0, col f1, row f1, ...] (rotate_half is applied over it as usual)."""
    spatial_dim = head_dim // 2
    exponent = torch.arange(0, spatial_dim, 2, dtype=torch.float32, device=row.device) / spatial_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 4,)
    angles = torch.stack([col.to(torch.float32)[:, None] * inv_freq, row.to(torch.float32)[:, None] * inv_freq],
                         dim=-1).flatten(1)  # (tokens, head_dim / 2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # (tokens, 1, head_dim / 2) each


def time_table(hidden: int, frames: int, device: torch.device) -> torch.Tensor:
    """(frames + 1, hidden) float32: a zero row (a single-frame chunk adds nothing), then sin-cos
    rows of frames 0..frames-1 over the hidden channels, as the reference computes them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hidden, 2, device=device).to(torch.float32) / hidden))
    angles = torch.outer(torch.arange(frames, device=device, dtype=torch.float32), inv_freq)  # (frames, hidden / 2)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # (frames, hidden)
    return torch.cat([table.new_zeros(1, hidden), table])
