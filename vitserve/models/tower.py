"""What every tower shares around its own forward and metadata: the protocol's item counts (from its
geometry), the attention backend's choice, and the eager reference path on processor outputs."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .attention import AttentionFn, head_width, select_attention
from .protocol import EncoderOutput, check_patches, grid_list, pack_grids


class TowerBase(nn.Module):
    """A tower sets `config` (with `head_dim`), `geometry`, `requested_attention` and implements
    `metadata`, `forward`, `_embed_weight` and `_attention_modules`."""

    attention_backend: str | None = None
    _attend: AttentionFn | None = None

    def _embed_weight(self) -> torch.Tensor:
        """The patch embedding's weight: where the tower lives and in which dtype."""
        raise NotImplementedError

    def _attention_modules(self) -> Iterable[nn.Module]:
        """The modules whose `head_width` the attention backend sets."""
        raise NotImplementedError

    # -- protocol ---------------------------------------------------------------------------
    def item_tokens(self, t: int, h: int, w: int) -> int:
        return t * h * w

    def item_sequences(self, t: int, h: int, w: int) -> int:
        return len(self.geometry.item_segments(t, h, w))

    # -- conveniences -----------------------------------------------------------------------
    def attend(self) -> AttentionFn:
        """The attention backend, chosen at the first forward when none was yet."""
        return self._attend or self.select_attention(self.requested_attention)

    def select_attention(self, requested: str | None) -> AttentionFn:
        """Pick (and remember) the attention backend for this model's device and dtype."""
        weight = self._embed_weight()
        self.attention_backend, self._attend = select_attention(requested, weight.device, weight.dtype)
        self.requested_attention = requested
        for module in self._attention_modules():
            module.head_width = head_width(self.attention_backend, self.config.head_dim)
        return self._attend

    @torch.inference_mode()
    def encode_patches(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> EncoderOutput:
        """Eager reference path on the family's processor outputs: `pixel_values` (sum t*h*w, patch_dim),
        `grid_thw` (items, 3) in patch units. Outputs: each item's rows, back to back."""
        grids = grid_list(grid_thw)
        packed = pack_grids(self, grids)
        check_patches(pixel_values, packed.num_tokens, self.geometry, grids)
        device = self._embed_weight().device
        meta = self.metadata(
            packed.layout.to(device), packed.num_tokens, packed.num_sequences, packed.max_seqlen, packed.segment_lengths
        )
        out = self.forward(pixel_values.to(device), meta)
        rows = sum(self.geometry.item_rows(*grid) for grid in grids)  # (fewer than tokens / 4 when frames pool)
        return EncoderOutput(out.embeddings[:rows], out.deepstack[:, :rows])
