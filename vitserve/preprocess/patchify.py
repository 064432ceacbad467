"""Frames to patch rows in Qwen-VL's layout or in raster order (Kimi K2.5), the zero padding of the navit
rule, and the fused rescale + normalise.

Qwen-VL's rows run over (grid_t, grid_h/m, grid_w/m, m, m): the m×m patches that the merger joins
are adjacent. Columns run over (C, T, P, P), T holding consecutive frames. Images fill
the temporal patch by repeating their frame; videos are padded to a multiple of T by
repeating their last frame. Raster rows (temporal patch 1) run over (frames, grid_h, grid_w),
columns over (C, P, P).
"""

from __future__ import annotations

import functools

import torch

from vitserve.preprocess.config import PreprocessConfig

# HF fuses rescale (1/255) and normalise into (x - mean*255) / (std*255) in float32; the
# scaled mean/std are float32 products computed the same way so the results are bitwise equal.
_INVERSE_RESCALE = 1.0 / (1 / 255)


def patchify_into(frames: torch.Tensor, out: torch.Tensor, config: PreprocessConfig) -> None:
    """Write uint8 frames (B, F, C, h, w) of B equal-sized items into their rows, as float.

    `out` holds the B items' rows back to back: (B*t*h*w/P², C*T*P*P). The copy goes
    straight into a permuted view of `out`, so nothing intermediate is allocated; padding
    frames are written from a broadcast view of the last frame.
    """
    if config.raster_patches:
        _raster_patchify_into(frames, out, config.patch_size)
        return
    batch, num_frames, channels, height, width = frames.shape
    patch, merge, temporal = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_t = -(-num_frames // temporal)
    blocks_h, blocks_w = height // (patch * merge), width // (patch * merge)
    # (B, t, h/m, w/m, m, m, C, T, P, P) -> (B, t, T, C, h/m, m, P, w/m, m, P): `out` seen as frames
    out_frames = out.view(batch, grid_t, blocks_h, blocks_w, merge, merge, channels, temporal, patch, patch)
    out_frames = out_frames.permute(0, 1, 7, 6, 2, 4, 8, 3, 5, 9)
    # (B, F, C, h, w) -> (B, F, C, h/m, m, P, w/m, m, P)
    frame_blocks = frames.unflatten(4, (blocks_w, merge, patch)).unflatten(3, (blocks_h, merge, patch))
    full = num_frames // temporal
    if full:
        out_frames[:, :full].copy_(frame_blocks[:, : full * temporal].unflatten(1, (full, temporal)))
    remainder = num_frames - full * temporal
    last_frame = frame_blocks[:, -1:]  # (B, 1, C, h/m, m, P, w/m, m, P)
    if remainder == 1:  # every slot of the last temporal patch shows the last frame (all images)
        out_frames[:, full].copy_(last_frame.expand(-1, temporal, *last_frame.shape[2:]))
    elif remainder:
        out_frames[:, full, :remainder].copy_(frame_blocks[:, full * temporal :])
        padding = last_frame.expand(-1, temporal - remainder, *last_frame.shape[2:])
        out_frames[:, full, remainder:].copy_(padding)


def _raster_patchify_into(frames: torch.Tensor, out: torch.Tensor, patch: int) -> None:
    """Kimi K2.5's layout: (B, F, C, h, w) into rows (B*F*h/P*w/P, C*P*P), a frame's patches row by row."""
    batch, num_frames, channels, height, width = frames.shape
    out_patches = out.view(batch, num_frames, height // patch, width // patch, channels, patch, patch)
    frame_patches = frames.unflatten(4, (width // patch, patch)).unflatten(3, (height // patch, patch))
    out_patches.copy_(frame_patches.permute(0, 1, 3, 5, 2, 4, 6))  # (B, F, h/P, w/P, C, P, P)


def pad_bottom_right(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, h, w) uint8 -> (N, C, height, width) with zeros below and to the right, as Hugging Face's Kimi
    processors pad before normalising (so the padding's rows hold (0 - mean) / std)."""
    if frames.shape[-2:] == (height, width):
        return frames
    padded = frames.new_zeros((*frames.shape[:-2], height, width))
    padded[..., : frames.shape[-2], : frames.shape[-1]] = frames
    return padded


def normalize_(pixel_values: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """In place on rows (N, C*T*P*P) of 0..255 values: (x - mean*255) / (std*255) per channel."""
    mean, std = _scaled_mean_std(pixel_values.device, config.image_mean, config.image_std)
    by_channel = pixel_values.view(pixel_values.shape[0], 3, config.patch_dim // 3)  # (N, C, T*P*P)
    by_channel.sub_(mean[:, None]).div_(std[:, None])
    return pixel_values


@functools.lru_cache(maxsize=64)
def _scaled_mean_std(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mean*255 and std*255 (C,) on `device`, made once per device and config: a tensor made from a
    list goes to the device in a synchronous copy, which waits for all the work queued there (a
    worker preprocessing window N+1 would wait for window N's forward). Made on the host (float32
    products, rounded as on any device) and copied synchronously, so every stream sees them whole;
    outside inference mode, so that a later call that autograd tracks may use them too."""
    with torch.inference_mode(False):
        mean_255 = (torch.tensor(mean, dtype=torch.float32) * _INVERSE_RESCALE).to(device)  # (C,)
        std_255 = (torch.tensor(std, dtype=torch.float32) * _INVERSE_RESCALE).to(device)  # (C,)
    return mean_255, std_255
