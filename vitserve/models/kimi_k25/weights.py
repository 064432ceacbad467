"""Kimi K2.5's checkpoints keep q and k of each `wqkv` in the layout of an interleaved rotary (channel
pairs 2i, 2i + 1 turn together). Our rotary (rotary.py) turns channel i with i + head_dim / 2, as
transformers' port of the model does: the q and k rows are permuted once, at load, the way that port
converts them (per head, (head_dim / 2, 2) -> (2, head_dim / 2))."""

from __future__ import annotations

import torch

from .config import KimiK25VisionConfig


def to_rotate_half(state: dict[str, torch.Tensor], config: KimiK25VisionConfig) -> dict[str, torch.Tensor]:
    """`state` with every block's q and k rows (weights and biases of `wqkv`) permuted."""
    heads, half = config.num_heads, config.head_dim // 2
    for name in [n for n in state if n.endswith(("wqkv.weight", "wqkv.bias"))]:
        q, k, v = state[name].chunk(3)  # (hidden, ...) each

        def permute(rows: torch.Tensor) -> torch.Tensor:
            per_head = rows.reshape(heads, half, 2, *rows.shape[1:])  # (heads, head_dim / 2, 2, ...)
            return per_head.transpose(1, 2).reshape(rows.shape)

        state[name] = torch.cat([permute(q), permute(k), v])
    return state
