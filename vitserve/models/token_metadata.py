"""Per-token metadata of a packed window, derived on the device from its layout: what every tower
of the Qwen-style protocol shares (block-order positions, axial rotary tables, segment bounds).

Every op here has a shape fixed by (num_tokens, num_sequences) and reads the layout only
through device tensors: no host sync, no data-dependent shape. The same function serves the
eager path and the inside of a captured CUDA graph. A tower brings its own position-embedding
taps (`PositionTaps`): bilinear on a 48x48 table for Qwen3-VL, bicubic on 24x24 for GLM-4.xV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# (row, col, height, width) of each token (all (tokens,) int64) -> (index, weight), each
# (tokens, taps): rows of the tower's learned position table and their float32 weights
PositionTaps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TokenMetadata:
    pos_index: torch.Tensor  # (tokens, taps) int64 rows of the learned position table
    pos_weight: torch.Tensor  # (tokens, taps) float32 interpolation weights (0 for padding)
    rope_cos: torch.Tensor  # (tokens, 1, head_dim / 2) float32
    rope_sin: torch.Tensor  # (tokens, 1, head_dim / 2) float32
    cu_seqlens: torch.Tensor  # (sequences + 1,) int32 segment boundaries
    max_seqlen: int  # host upper bound of any segment length
    segment_lengths: tuple[int, ...] | None = None  # host copy of the lengths, when known

    @property
    def num_tokens(self) -> int:
        return self.pos_index.shape[0]


def build_token_metadata(
    layout: torch.Tensor,
    num_tokens: int,
    num_sequences: int,
    max_seqlen: int,
    segment_lengths: Sequence[int] | None,
    *,
    merge: int,
    head_dim: int,
    rope_theta: float,
    position_taps: PositionTaps,
) -> TokenMetadata:
    """Metadata for `num_tokens` tokens laid out by `layout` (items, 5) int64, one segment per
    temporal patch, frames stored in merge-block order.

    Tokens past the last item are padding: position 0 of the rotary table, zero position
    embedding, and one segment of their own. When there are padding tokens, `num_sequences`
    must exceed the real segment count so that the padding segment exists; extra capacity
    becomes empty segments at the end.
    """
    device = layout.device
    t, h, w, token_offset, sequence_offset = layout.t().contiguous()  # each (items,)
    frame_tokens = (h * w).clamp(min=1)  # (items,)
    real_tokens = (t * h * w).sum()  # () int64

    token = torch.arange(num_tokens, device=device)  # (tokens,)
    item = (torch.searchsorted(token_offset, token, right=True) - 1).clamp(min=0)  # (tokens,)
    is_real = token < real_tokens  # (tokens,)
    row, col = merge_order_position(token - token_offset[item], frame_tokens[item], w[item], merge)
    row, col = row * is_real, col * is_real  # padding sits at position (0, 0)

    pos_index, pos_weight = position_taps(row, col, h[item], w[item])
    pos_weight = pos_weight * is_real[:, None]  # (tokens, taps): padding gets no position embedding
    rope_cos, rope_sin = rotary_tables(row, col, head_dim, rope_theta)

    cu_seqlens = segment_bounds(layout, num_tokens, num_sequences)
    return TokenMetadata(pos_index, pos_weight, rope_cos, rope_sin, cu_seqlens, max_seqlen,
                         checked_lengths(segment_lengths, num_tokens, num_sequences))


def segment_bounds(layout: torch.Tensor, num_tokens: int, num_sequences: int, pool: int = 1) -> torch.Tensor:
    """cu_seqlens (sequences + 1,) int32: each item's segments of `pool` frames (its last one
    shorter), then one padding segment when tokens are left, then empty ones up to the capacity."""
    t, h, w, token_offset, sequence_offset = layout.t()  # each (items,)
    real_tokens = (t * h * w).sum()  # () int64
    real_sequences = ((t + pool - 1) // pool).sum()  # ()
    segment = torch.arange(num_sequences + 1, device=layout.device)  # (sequences + 1,)
    owner = (torch.searchsorted(sequence_offset.contiguous(), segment, right=True) - 1).clamp(min=0)
    start = token_offset[owner] + (segment - sequence_offset[owner]) * pool * h[owner] * w[owner]
    padding_start = torch.where(segment < num_sequences, real_tokens, num_tokens)
    return torch.where(
        segment < real_sequences,
        start,
        torch.where(segment == real_sequences, padding_start, num_tokens),
    ).to(torch.int32)  # (sequences + 1,)


def checked_lengths(segment_lengths: Sequence[int] | None, num_tokens: int, num_sequences: int) -> tuple[int, ...] | None:
    """The host's segment lengths, checked against the window's capacities."""
    lengths = tuple(segment_lengths) if segment_lengths is not None else None
    if lengths is not None and (sum(lengths) != num_tokens or len(lengths) > num_sequences):
        raise ValueError(
            f"segment_lengths {list(lengths)} must sum to num_tokens {num_tokens} in at most "
            f"{num_sequences} segments"
        )
    return lengths


def merge_order_position(
    index_in_item: torch.Tensor, frame_tokens: torch.Tensor, width: torch.Tensor, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each token; a frame is stored in (block_row, block_col, in_row, in_col) order."""
    within = index_in_item % frame_tokens  # (tokens,) every frame of a video repeats the grid
    blocks_per_row = (width // merge).clamp(min=1)
    in_col = within % merge
    in_row = (within // merge) % merge
    block = within // (merge * merge)
    row = (block // blocks_per_row) * merge + in_row
    col = (block % blocks_per_row) * merge + in_col
    return row, col


def rotary_tables(
    row: torch.Tensor, col: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary: the first quarter of channels turns with the row, the second with the column.

    Computed in float32 on the metadata's device so that casting the model to bf16 never
    touches the frequencies (a known trap of keeping them as a module buffer).
    """
    spatial_dim = head_dim // 2
    exponent = torch.arange(0, spatial_dim, 2, dtype=torch.float32, device=row.device) / spatial_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 4,)
    angles = torch.cat(
        [row.to(torch.float32)[:, None] * inv_freq, col.to(torch.float32)[:, None] * inv_freq], dim=-1
    )  # (tokens, head_dim / 2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # (tokens, 1, head_dim / 2) each
