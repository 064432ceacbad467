"""Segment (varlen) attention as one Triton kernel whose grid grows with tokens, not segments.

FlashAttention's varlen kernel launches (max_seqlen / block) x segments x heads programs; a
budget graph must pass the budget as max_seqlen, so a window of short segments launches mostly
empty programs, and the kernel rounds head dim 72 up to 96. Here segment s owns the program
tiles [ceil(start_s / BLOCK_M) + s, ceil(end_s / BLOCK_M) + s + 1): every segment gets at
least the tiles it needs, and the grid is ceil(tokens / BLOCK_M) + segments per head, a shape
fixed by the window's capacities, so the launch is capturable. Each program finds its segment
by a binary search over the boundaries. The head dim is covered by a power-of-two main part
plus a small tail (72 = 64 + 16), so little of the tensor-core work is padding.

The kernel reads q, k and v heads `padded_head_dim` wide without channel masks: the caller
lays them out so (`rotary_qk(..., head_width=...)` or `pad_heads`), with zeros in the padding
of q and k. (Masked channel loads feeding the 16-wide tail dot miscompile in Triton 3.6 on
Hopper: wrong tail channels or illegal addresses; unmasked loads are also faster.)

The numerics are FlashAttention's: float32 scores and online softmax, probabilities rounded to
the input dtype before they multiply V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MIN_DOT = 16  # smallest tensor-core operand dimension Triton accepts
# One compiled kernel for every window of up to 2**8 segments (and one more up to 2**16: the
# search's steps go in multiples of 8). Each constexpr value is a kernel of its own, compiled (about
# a second) the first time a window needs it: with the search's steps fitted to each window, an
# eager window of 9 to 15 or 33 to 63 segments needed a kernel that no graph and no calibration run
# had compiled, in the middle of serving. The spare steps cost little: the kernel alone took -7 to
# +4 % against the fitted one on windows of 1 to 64 segments (H200). Triton also compiles an integer
# argument equal to 1 or divisible by 16 separately (`do_not_specialize` below).
MIN_SEARCH_STEPS = 8  # (the step count is a multiple of it)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = KernelConfig()  # the best over the workloads' windows on an H100 (tools/attention_bench.py)


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(main, tail) power-of-two widths that cover head_dim; tail is 0 when main covers it."""
    if head_dim <= MIN_DOT:
        return MIN_DOT, 0
    main = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    rest = head_dim - main
    return main, (max(MIN_DOT, 1 << (rest - 1).bit_length()) if rest else 0)


def padded_head_dim(head_dim: int) -> int:
    """Width per head that q, k and v must be laid out with for the kernel."""
    return sum(split_head_dim(head_dim))


def pad_heads(x: torch.Tensor) -> torch.Tensor:
    """A (tokens, heads, head_dim) view of a zero-padded copy of x laid out as the kernel needs."""
    head_dim = x.shape[-1]
    return torch.nn.functional.pad(x, (0, padded_head_dim(head_dim) - head_dim))[..., :head_dim]


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments,
                      config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Attention of q, k, v (tokens, heads, head_dim) within the segments of `segments.cu_seqlens`
    ((segments + 1,) int32 on the device, last entry = tokens). Returns (tokens, heads, head_dim)."""
    tokens, heads, head_dim = q.shape
    width = padded_head_dim(head_dim)
    for name, x in (("q", q), ("k", k), ("v", v)):
        last = x.storage_offset() + (tokens - 1) * x.stride(0) + (heads - 1) * x.stride(1) + width
        if x.stride(-1) != 1 or x.stride(1) < width or last > x.untyped_storage().nbytes() // x.element_size():
            raise ValueError(
                f"segment_attention reads {name} heads {width} channels wide (head_dim {head_dim} padded); got "
                f"strides {x.stride()}: lay q, k, v out with rotary_qk(..., head_width={width}) or pad_heads()"
            )
    cu_seqlens = segments.cu_seqlens
    num_segments = cu_seqlens.numel() - 1
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)  # (tokens, heads, head_dim)
    main, tail = split_head_dim(head_dim)
    search_steps = -(-max(1, (num_segments - 1).bit_length()) // MIN_SEARCH_STEPS) * MIN_SEARCH_STEPS  # 8, 16, ...
    grid = (triton.cdiv(tokens, config.block_m) + num_segments, heads)
    _segment_attention_kernel[grid](
        q, k, v, out, cu_seqlens, num_segments,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        head_dim**-0.5 * math.log2(math.e), head_dim,
        MAIN=main, TAIL=tail, SEARCH_STEPS=search_steps,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


if triton is not None:

    @triton.jit
    def _load_head_slice(base, rows, row_ok, row_stride, head_offset, first: tl.constexpr, WIDTH: tl.constexpr,
                         TRANSPOSED: tl.constexpr):
        """(rows, WIDTH) channels [first, first + WIDTH) of one head; (WIDTH, rows) if TRANSPOSED. Rows
        past the segment read as zero; channels are not masked (the heads are laid out padded)."""
        channel = first + tl.arange(0, WIDTH)
        if TRANSPOSED:
            return tl.load(base + rows[None, :] * row_stride + head_offset + channel[:, None], mask=row_ok[None, :],
                           other=0.0)
        else:  # Triton needs the else to treat the two returns as one static choice
            return tl.load(base + rows[:, None] * row_stride + head_offset + channel[None, :], mask=row_ok[:, None],
                           other=0.0)

    @triton.jit(do_not_specialize=["num_segments"])
    def _segment_attention_kernel(
        q, k, v, out, cu_seqlens, num_segments,
        q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head,
        scale_log2,  # softmax scale * log2(e): the softmax runs on exp2
        head_dim,  # channels stored; a runtime value on purpose (see the module docstring)
        MAIN: tl.constexpr, TAIL: tl.constexpr, SEARCH_STEPS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        # Largest segment whose first tile ceil(start / BLOCK_M) + segment is <= tile.
        low = tile * 0
        high = low + num_segments - 1
        for _ in tl.static_range(SEARCH_STEPS):
            middle = (low + high + 1) // 2
            first_tile = (tl.load(cu_seqlens + middle) + BLOCK_M - 1) // BLOCK_M + middle
            fits = first_tile <= tile
            low = tl.where(fits, middle, low)
            high = tl.where(fits, high, middle - 1)
        start = tl.load(cu_seqlens + low)
        end = tl.load(cu_seqlens + low + 1)
        row_start = start + (tile - ((start + BLOCK_M - 1) // BLOCK_M + low)) * BLOCK_M
        if row_start >= end:  # a spare tile of this segment
            return

        rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < end
        q_main = _load_head_slice(q, rows, row_ok, q_row, head * q_head, 0, MAIN, False)  # (BLOCK_M, MAIN)
        acc_main = tl.zeros([BLOCK_M, MAIN], dtype=tl.float32)
        if TAIL > 0:
            q_tail = _load_head_slice(q, rows, row_ok, q_row, head * q_head, MAIN, TAIL, False)
            acc_tail = tl.zeros([BLOCK_M, TAIL], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

        for column_start in range(start, end, BLOCK_N):
            columns = column_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            column_ok = columns < end
            k_main = _load_head_slice(k, columns, column_ok, k_row, head * k_head, 0, MAIN, True)
            scores = tl.dot(q_main, k_main)  # (BLOCK_M, BLOCK_N) float32
            if TAIL > 0:
                k_tail = _load_head_slice(k, columns, column_ok, k_row, head * k_head, MAIN, TAIL, True)
                scores = tl.dot(q_tail, k_tail, scores)
            scores = tl.where(column_ok[None, :], scores * scale_log2, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            rescale = tl.exp2(row_max - new_max)  # (BLOCK_M,)
            probabilities = tl.exp2(scores - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probabilities, 1)
            probabilities = probabilities.to(v.dtype.element_ty)
            v_main = _load_head_slice(v, columns, column_ok, v_row, head * v_head, 0, MAIN, False)
            acc_main = tl.dot(probabilities, v_main, acc_main * rescale[:, None])  # (BLOCK_M, MAIN)
            if TAIL > 0:
                v_tail = _load_head_slice(v, columns, column_ok, v_row, head * v_head, MAIN, TAIL, False)
                acc_tail = tl.dot(probabilities, v_tail, acc_tail * rescale[:, None])
            row_max = new_max

        channel = tl.arange(0, MAIN)
        target = out + rows[:, None] * o_row + head * o_head + channel[None, :]
        tl.store(target, (acc_main / row_sum[:, None]).to(out.dtype.element_ty),
                 mask=row_ok[:, None] & (channel[None, :] < head_dim))
        if TAIL > 0:
            channel = MAIN + tl.arange(0, TAIL)
            target = out + rows[:, None] * o_row + head * o_head + channel[None, :]
            tl.store(target, (acc_tail / row_sum[:, None]).to(out.dtype.element_ty),
                     mask=row_ok[:, None] & (channel[None, :] < head_dim))
