"""The encoder protocol: what the runner, scheduler and engine may know about a vision tower.

A window of work is a packed run of patch tokens from several items (images or videos).
Each item is described by one row of an int64 *layout* tensor, the only per-window
metadata that has to travel to the device:

    (t, h, w, token_offset, sequence_offset)      grid in patch units, offsets into the window

Everything per token (position-embedding taps, rotary angles, segment boundaries) is
derived from the layout on the device, with static shapes, so that a captured graph can
replay any mix of items that fits its capacities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch

LAYOUT_COLUMNS = ("t", "h", "w", "token_offset", "sequence_offset")


@dataclass(frozen=True)
class EncoderGeometry:
    """Shapes that packing and output buffers depend on."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    hidden_size: int
    out_hidden_size: int
    num_deepstack: int
    # Grid time steps that attend together as one segment and are averaged into one frame of output
    # rows: 1 for Qwen3-VL and GLM (a segment per temporal patch); 4 for Kimi K2.5 (a video is cut into
    # chunks of 4 frames, each one segment whose output is the mean over its frames).
    temporal_pool: int = 1

    @property
    def patch_dim(self) -> int:
        """Width of one row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_factor(self) -> int:
        """Patch tokens per output token of one frame."""
        return self.merge_size**2

    def item_segments(self, t: int, h: int, w: int) -> list[int]:
        """Attention segment lengths of an item with grid (t, h, w), in order."""
        full, rest = divmod(t, self.temporal_pool)
        return [self.temporal_pool * h * w] * full + ([rest * h * w] if rest else [])

    def item_rows(self, t: int, h: int, w: int) -> int:
        """Output rows of an item: a frame's merged tokens per segment."""
        return item_rows((t, h, w), self.merge_factor, self.temporal_pool)


def item_rows(grid: Sequence[int], merge_factor: int, temporal_pool: int) -> int:
    """Output rows of an item with grid (t, h, w): one frame of merged tokens per segment."""
    t, h, w = grid
    return item_segment_count(t, temporal_pool) * (h * w // merge_factor)


def item_segment_count(t: int, temporal_pool: int) -> int:
    """Attention segments of an item of t grid frames: one per `temporal_pool` of them."""
    return -(-t // temporal_pool)


class EncoderOutput(NamedTuple):
    embeddings: torch.Tensor  # (tokens / merge², out_hidden)
    deepstack: torch.Tensor  # (num_deepstack, tokens / merge², out_hidden)


@runtime_checkable
class VisionEncoder(Protocol):
    """A vision tower that can run packed windows of items.

    `metadata` must be free of data-dependent shapes and host syncs given its static
    arguments, so it can run inside a CUDA graph; `forward` must not sync either.
    """

    geometry: EncoderGeometry
    model_type: str  # Hugging Face's model_type of the checkpoint, e.g. "qwen3_vl"
    weights_fingerprint: str  # models/fingerprint.py; empty when unknown (a tower built in code)

    def item_tokens(self, t: int, h: int, w: int) -> int:
        """Patch tokens of one item with grid (t, h, w)."""
        ...

    def item_sequences(self, t: int, h: int, w: int) -> int:
        """Attention sequences (segments) of one item."""
        ...

    def metadata(
        self,
        layout: torch.Tensor,
        num_tokens: int,
        num_sequences: int,
        max_seqlen: int,
        segment_lengths: Sequence[int] | None = None,
    ) -> "object":
        """Per-token metadata for a window of `num_tokens` tokens (padding included).

        `layout` is (items, 5) int64 on the model's device. Tokens past the last item form
        one padding segment; `num_sequences` counts the real segments, the padding one and
        any empty ones up to the capacity. `segment_lengths`, when the host knows them,
        lets backends that need host lengths (SDPA) avoid a dense mask.
        """
        ...

    def forward(self, pixel_values: torch.Tensor, metadata: object) -> EncoderOutput:
        """Encode packed patches (tokens, patch_dim) with metadata from `metadata`."""
        ...


@dataclass(frozen=True)
class PackedLayout:
    """Host-side description of a packed window, built from grids."""

    layout: torch.Tensor  # (items, 5) int64, see LAYOUT_COLUMNS
    num_tokens: int
    num_sequences: int
    segment_lengths: tuple[int, ...]

    @property
    def max_seqlen(self) -> int:
        return max(self.segment_lengths, default=0)


def pack_grids(encoder: VisionEncoder, grids: Sequence[Sequence[int]]) -> PackedLayout:
    """Lay items out back to back, in the given order, with no padding."""
    rows, segment_lengths = [], []
    tokens = sequences = 0
    for t, h, w in grids:
        rows.append((t, h, w, tokens, sequences))
        segments = encoder.geometry.item_segments(t, h, w)
        segment_lengths += segments
        tokens += encoder.item_tokens(t, h, w)
        sequences += len(segments)
    layout = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(LAYOUT_COLUMNS))
    return PackedLayout(layout, tokens, sequences, tuple(segment_lengths))


def grid_list(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """`grid_thw` as a list of (t, h, w) ints."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
    if not rows or any(not isinstance(r, (list, tuple)) or len(r) != 3 for r in rows):
        raise ValueError(f"grid_thw must be a non-empty (items, 3) list of (t, h, w), e.g. [[1, 4, 4]]; got {rows!r}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def check_patches(pixel_values: torch.Tensor, tokens: int, geometry: EncoderGeometry, grids: list) -> None:
    """Raise ValueError unless `pixel_values` is (tokens, patch_dim) and every grid is valid."""
    merge = geometry.merge_size
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(
                f"grid (t={t}, h={h}, w={w}) is invalid: t, h, w must be positive and h, w multiples of "
                f"the merge size {merge}"
            )
    expected = (tokens, geometry.patch_dim)
    if pixel_values.dim() != 2 or tuple(pixel_values.shape) != expected:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grids} needs {expected} "
            "(sum of t*h*w rows of C*T*P*P values)"
        )
