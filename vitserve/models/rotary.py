"""2D rotary embedding of queries and keys, fused on CUDA.

Unfused, the float32 rotation of q and k is about twenty elementwise kernels per layer (casts,
halves, products, sums, concatenations): on an H100 they cost more than the layer's attention
for small windows, and 12 ms of a 70 ms 8192-token window. One Triton kernel reads q and k
straight from the qkv projection and writes both rotated, with the same float32 arithmetic.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference: channel j turns with channel j + head_dim/2, in float32 (as Hugging Face does)."""
    first, second = x.float().chunk(2, dim=-1)  # (tokens, heads, head_dim / 2) each
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.to(x.dtype)  # (tokens, heads, head_dim)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_width: int | None = None):
    """(tokens, 3 * hidden) projection -> rotated q, rotated k, and v, each (tokens, heads, head_dim).

    `cos` and `sin` are (tokens, 1, head_dim / 2) float32. With `head_width` > head_dim, all
    three are views of a buffer whose heads are `head_width` wide with zeros past head_dim (what
    the Triton segment-attention kernel loads without channel masks); v is then copied too.
    """
    tokens = qkv.shape[0]
    q, k, v = qkv.view(tokens, 3, heads, -1).unbind(1)  # (tokens, heads, head_dim) each
    head_dim = q.shape[-1]
    width = head_width or head_dim
    if width < head_dim:
        raise ValueError(f"head_width {width} is narrower than head_dim {head_dim}")
    if triton is None or not qkv.is_cuda:
        rotated = (rotate_half_pairs(q, cos, sin), rotate_half_pairs(k, cos, sin), v)
        if width == head_dim:
            return rotated
        padded = torch.nn.functional.pad(torch.stack(rotated), (0, width - head_dim))  # (3, tokens, heads, width)
        return tuple(padded[..., :head_dim].unbind(0))
    outputs = 2 if width == head_dim else 3  # v is only copied when its heads must be widened
    rotated = torch.empty(outputs, tokens, heads, width, dtype=qkv.dtype, device=qkv.device)  # (q|k|v, tokens, heads, width)
    half = head_dim // 2
    _rotary_kernel[(tokens, outputs)](
        qkv, cos, sin, rotated, qkv.stride(0), tokens,
        HEADS=heads, HALF=half, WIDTH=width,
        BLOCK_HEADS=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PAD=triton.next_power_of_2(max(1, width - head_dim)),
    )
    views = rotated[..., :head_dim]  # (outputs, tokens, heads, head_dim)
    return views[0], views[1], (views[2] if outputs == 3 else v)


if triton is not None:

    # (tokens varies with every eager window: not compiled anew for counts equal to 1 or divisible by 16)
    @triton.jit(do_not_specialize=["tokens"])
    def _rotary_kernel(qkv, cos, sin, out, qkv_row_stride, tokens, HEADS: tl.constexpr, HALF: tl.constexpr,
                       WIDTH: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       BLOCK_PAD: tl.constexpr):
        token = tl.program_id(0)
        which = tl.program_id(1)  # 0: q, 1: k (both rotated), 2: v (copied)
        head = tl.arange(0, BLOCK_HEADS)[:, None]
        channel = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (head < HEADS) & (channel < HALF)
        source = qkv + token * qkv_row_stride + which * HEADS * 2 * HALF + head * 2 * HALF + channel
        first = tl.load(source, mask=mask).to(tl.float32)
        second = tl.load(source + HALF, mask=mask).to(tl.float32)
        c = tl.load(cos + token * HALF + channel, mask=channel < HALF)
        s = tl.load(sin + token * HALF + channel, mask=channel < HALF)
        turn = which < 2
        c = tl.where(turn, c, 1.0)  # v passes through unchanged (exact: x * 1 - y * 0)
        s = tl.where(turn, s, 0.0)
        target = out + (which * tokens + token) * HEADS * WIDTH + head * WIDTH + channel
        tl.store(target, (first * c - second * s).to(out.dtype.element_ty), mask=mask)
        tl.store(target + HALF, (second * c + first * s).to(out.dtype.element_ty), mask=mask)
        if WIDTH > 2 * HALF:
            pad = tl.arange(0, BLOCK_PAD)[None, :]
            tl.store(out + (which * tokens + token) * HEADS * WIDTH + head * WIDTH + 2 * HALF + pad,
                     tl.zeros([BLOCK_HEADS, BLOCK_PAD], dtype=out.dtype.element_ty),
                     mask=(head < HEADS) & (pad < WIDTH - 2 * HALF))
