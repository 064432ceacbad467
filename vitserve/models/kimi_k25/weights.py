"""Kimi K2.5's checkpoints keep q and k of each `wqkv` in the layout of an interleaved rotary (channel
pairs 2i, 2i + 1 turn together). Our rotary (rotary.py) turns channel i with i + head_dim / 2, as
transformers' port of the model does: the q and k rows are permuted once, at load, the way that port
converts them (per head, (head_dim / 2, 2) -> (2, head_dim / 2))."""

from __future__ import annotations

import torch

from .config import KimiK25VisionConfig


def to_rotate_half(state: dict[str, torch.Tensor], config: KimiK25VisionConfig) -> dict[str, torch.Tensor]:
    """`state` with every block's q and k rows (weights and biases of `wqkv`) permuted."""
    return _permute_qk(state, config.num_heads, (config.head_dim // 2, 2))


def to_interleaved(state: dict[str, torch.Tensor], num_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The inverse: q and k rows back in the files' layout (to fingerprint weights held permuted)."""
    return _permute_qk(state, num_heads, (2, head_dim // 2))


def _permute_qk(state: dict[str, torch.Tensor], num_heads: int, split: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Each head's rows seen as `split` (a, b), transposed to (b, a)."""
    for name in [n for n in state if n.endswith(("wqkv.weight", "wqkv.bias"))]:
        q, k, v = state[name].chunk(3)  # (hidden, ...) each

        def permute(rows: torch.Tensor) -> torch.Tensor:
            per_head = rows.reshape(num_heads, *split, *rows.shape[1:])  # (heads, a, b, ...)
            return per_head.transpose(1, 2).reshape(rows.shape)

        state[name] = torch.cat([permute(q), permute(k), v])
    return state
