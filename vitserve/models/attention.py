"""Segment (varlen) attention backends: flash_attn, triton, torch_varlen, sdpa.

All take q, k, v as (tokens, heads, head_dim) and segment boundaries, and attend only
within a segment. The choice is made once per model and logged once.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from vitserve.choices import ATTENTION_BACKENDS as BACKENDS

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


class Segments(Protocol):
    cu_seqlens: torch.Tensor  # (segments + 1,) int32
    max_seqlen: int
    segment_lengths: Sequence[int] | None


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Segments], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Portable path. With host-known lengths: one SDPA call per run of equal-length segments
    (a window of same-size images is one batched call; no quadratic mask); without: one call
    with a block-diagonal mask built on the device (capturable)."""
    if segments.segment_lengths is not None:
        pieces, start = [], 0
        for length, run in itertools.groupby(segments.segment_lengths):
            count = len(list(run))
            if length == 0:
                continue
            end = start + count * length
            # (count, heads, length, head_dim): the run's segments as one batch
            qs, ks, vs = (x[start:end].unflatten(0, (count, length)).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs)
            pieces.append(out.transpose(1, 2).flatten(0, 1))  # (count * length, heads, head_dim)
            start = end
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, heads, tokens, head_dim)
    token = torch.arange(q.shape[2], device=q.device)
    segment_id = torch.searchsorted(segments.cu_seqlens[1:], token.to(torch.int32), right=True)  # (tokens,)
    mask = segment_id[:, None] == segment_id[None, :]  # (tokens, tokens) block diagonal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out[0].transpose(0, 1)  # (tokens, heads, head_dim)


def torch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = segments.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, segments.max_seqlen, segments.max_seqlen)  # (tokens, heads, head_dim)


def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, segments.max_seqlen, segments.max_seqlen, causal=False)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    from .segment_attention import segment_attention

    return segment_attention(q, k, v, segments)  # (tokens, heads, head_dim)


_FUNCTIONS: dict[str, AttentionFn] = {
    "flash_attn": flash_attn_attention,
    "triton": triton_attention,
    "torch_varlen": torch_varlen_attention,
    "sdpa": sdpa_attention,
}


def head_width(backend: str, head_dim: int) -> int:
    """Channels per head the backend wants q, k and v laid out with (more than head_dim: zero padding)."""
    if backend == "triton":
        from .segment_attention import padded_head_dim

        return padded_head_dim(head_dim)
    return head_dim


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run here, best first."""
    names = []
    if device.type == "cuda" and dtype in HALF_DTYPES:
        # The Triton kernel first: its grid follows tokens, not max_seqlen x segments, which on an H100
        # made it 1.4-1.9x faster than FlashAttention-2's varlen kernel on the workloads' windows.
        if importlib.util.find_spec("triton") is not None:
            names.append("triton")
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("torch_varlen")
    names.append("sdpa")
    return names


_logged: set[tuple[str, str, str]] = set()


def select_attention(requested: str | None, device: torch.device, dtype: torch.dtype) -> tuple[str, AttentionFn]:
    """The requested backend, or the best available one; an unavailable request is an error."""
    available = available_backends(device, dtype)
    if requested is None:
        name = available[0]
    elif requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {list(BACKENDS)}")
    elif requested not in available:
        raise ValueError(
            f"attention backend {requested!r} is not available on {device.type} with {dtype} "
            f"(flash_attn, triton and torch_varlen need CUDA and float16/bfloat16; flash_attn needs "
            f"the flash-attn package, triton the triton package); available here: {available}"
        )
    else:
        name = requested
    key = (name, device.type, str(dtype))
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend: %s (%s, %s; available: %s)", name, device.type, dtype, ", ".join(available))
    return name, _FUNCTIONS[name]
