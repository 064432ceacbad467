"""Bicubic antialiased resize of uint8 frames, bit-exact with the Hugging Face processor on CPU.

The HF torchvision backend resizes uint8 on CPU with torch's native uint8 kernel (a port
of Pillow-SIMD): a horizontal then a vertical pass, each with int16 fixed-point weights
and its result rounded and clamped to uint8. A float resize (what torchvision does on
CUDA) keeps the intermediate unclamped and differs by up to ~22 uint8 steps on noisy
content; even a float two-pass with rounding differs by 2. So on devices other than the
CPU we run the same integer algorithm with plain tensor ops (`resize_uint8_portable`),
which makes the GPU path equal to the CPU path, not just close to it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

# Keys' cubic kernel with a = -0.5, as Pillow and torch's antialiased bicubic use.
_CUBIC_A = -0.5
# Bound on the int32 accumulator of one chunk of frames (elements), to cap device memory.
_CHUNK_ELEMENTS = 1 << 27


def resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, height, width) uint8; the kernel depends on the device."""
    if frames.shape[-2:] == (height, width):
        return frames
    if frames.device.type == "cpu":
        return resize_uint8_native(frames, height, width)
    return resize_uint8_portable(frames, height, width)


def resize_uint8_native(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torch's CPU uint8 kernel: the very call HF's torchvision backend makes."""
    return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def resize_uint8_portable(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The native kernel's integer arithmetic in device-agnostic tensor ops (exact on any device)."""
    batch, channels, in_height, in_width = frames.shape
    per_frame = channels * max(in_height, height) * max(in_width, width)
    chunk = max(1, _CHUNK_ELEMENTS // per_frame)
    outputs = []
    for start in range(0, batch, chunk):
        part = frames[start : start + chunk]  # (n, C, H, W)
        if in_width != width:
            part = _resample_axis(part, dim=3, out_size=width)  # (n, C, H, width)
        if in_height != height:
            part = _resample_axis(part, dim=2, out_size=height)  # (n, C, height, width)
        outputs.append(part)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _resample_axis(frames: torch.Tensor, *, dim: int, out_size: int) -> torch.Tensor:
    """One separable pass along `dim` with rounding to uint8, as the native kernel does."""
    indices, weights, precision = _resample_weights_on(frames.device, frames.shape[dim], out_size)  # (out, K)
    if dim == 2:
        weights = weights[:, None, :]  # (out, 1, K): broadcast over the width axis
    out_shape = list(frames.shape)
    out_shape[dim] = out_size
    # Start from half of the fixed-point unit so that the final shift rounds to nearest.
    # int32 is enough: |sum| <= 255 * sum(|w|) * 2**precision with sum(|w|) ~ 1.1 and precision <= 22.
    accumulator = torch.full(out_shape, 1 << (precision - 1), dtype=torch.int32, device=frames.device)
    for tap in range(indices.shape[1]):
        taps = frames.index_select(dim, indices[:, tap])  # (n, C, *, out) or (n, C, out, *)
        accumulator.addcmul_(taps, weights[..., tap])
    accumulator >>= precision
    return accumulator.clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=512)
def _resample_weights_on(
    device: torch.device, in_size: int, out_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """resample_weights kept on `device`, so repeated sizes cost no host-to-device copy."""
    indices, weights, precision = resample_weights(in_size, out_size)
    return indices.to(device), weights.to(device), precision


@functools.lru_cache(maxsize=512)
def resample_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Source indices (out, K) int64, int16-valued weights (out, K) int32 and their precision.

    Follows torch's `_compute_index_ranges_int16_weights` for antialiased bicubic in
    double precision: normalised filter taps per output pixel, then scaled by
    2**precision (the largest precision keeping every weight within int16) and rounded
    half away from zero. Taps past a pixel's support get weight 0 and a valid index.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic spans 2 source pixels each side
    taps = int(np.ceil(support)) * 2 + 1
    inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0

    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)  # (out,)
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # (out,)
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)  # (out,)
    count = np.clip(last - first, 0, taps)  # (out,)
    offsets = np.arange(taps, dtype=np.int64)  # (K,)
    source = first[:, None] + offsets[None, :]  # (out, K)
    valid = offsets[None, :] < count[:, None]  # (out, K)
    weights = np.where(valid, _cubic((source - center[:, None] + 0.5) * inverse_scale), 0.0)

    total = np.zeros(out_size, dtype=np.float64)
    for tap in range(taps):  # left to right, as the C loop sums (not numpy's pairwise sum)
        total += weights[:, tap]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    largest = max(0.0, float(weights.max()))

    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * float(1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    indices = np.minimum(source, in_size - 1)
    return (
        torch.from_numpy(indices),
        torch.from_numpy(fixed.astype(np.int32)),
        precision,
    )


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, with the operation order of torch's C++ code."""
    a = _CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
