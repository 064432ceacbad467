"""preprocess_image, preprocess_video and preprocess_batch: uint8 pixels to (pixel_values, grid_thw)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from vitserve.preprocess.config import PreprocessConfig
from vitserve.preprocess.geometry import ItemPlan, plan_image, plan_video
from vitserve.preprocess.patchify import normalize_, pad_bottom_right, patchify_into
from vitserve.preprocess.resize import resize_uint8
from vitserve.preprocess.validate import Kind, as_frames

Pixels = np.ndarray | torch.Tensor


class Patches(NamedTuple):
    """What the vision tower takes, as the Hugging Face Qwen3-VL processor returns it.

    pixel_values: float32 (sum of t*h*w, C*T*P*P), items concatenated in input order.
    grid_thw: int64 (items, 3) on the CPU, each row (t, h, w) in patches.

    With Kimi K2.5's preprocessing, rows are (C*P*P) wide, a frame's patches in raster order, and a video is one
    item whose grid_t is its frame count: its rows are Hugging Face's chunk rows concatenated (the processor
    gives one grid row per chunk of up to 4 frames; the tower cuts the chunks itself).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


def preprocess_image(image: Pixels, config: PreprocessConfig | None = None) -> Patches:
    """One uint8 H×W×3 RGB image, on the CPU; equals HF `Qwen2VLImageProcessor` (torchvision), or
    `Glm4vImageProcessor` with `released_preprocess("glm4v")`, or `Kimi_K25ImageProcessor` (its
    (N, C, P, P) pixel_values flattened to rows) with `released_preprocess("kimi_k25")`.

    The frame is repeated to fill one temporal patch, so grid_thw is (1, h, w).
    """
    return _preprocess_items([image], config, torch.device("cpu"), kind="image")


def preprocess_video(frames: Pixels, config: PreprocessConfig | None = None) -> Patches:
    """One uint8 T×H×W×3 RGB clip of already sampled frames, on the CPU.

    Equals HF `Qwen3VLVideoProcessor(do_sample_frames=False, cap_pixels_per_frame=False)`:
    the resize limits count all frames, and an odd frame count is padded by repeating the
    last frame. A 1-frame clip, which HF rejects, is treated as the 2-frame clip that
    repeats it (the same pixels and grid as HF gives for that clip), so grid_t is 1.

    With `released_preprocess("kimi_k25")`: `Kimi_K25VideoProcessor(do_sample_frames=False)`'s rows, its
    chunks' rows in order, and one grid (frames, h, w) where HF gives a row per chunk of up to 4 frames
    (the last chunk holds the remaining frames, not padded); grid_t is the sum of the chunks' t.
    """
    return _preprocess_items([frames], config, torch.device("cpu"), kind="video")


def preprocess_batch(
    items: Sequence[Pixels],
    config: PreprocessConfig | None = None,
    device: str | torch.device | None = None,
) -> Patches:
    """Images (H×W×3) and videos (T×H×W×3), told apart by rank, processed together on `device`.

    The uint8 pixels are uploaded, items with equal input and resized sizes are resized
    in one call, and normalisation and patchifying run on the device; pixel_values come
    back on `device` in input order, grid_thw on the CPU. Results equal the per-item
    functions: the resize on non-CPU devices runs the CPU kernel's integer arithmetic.
    """
    return _preprocess_items(list(items), config, torch.device(device or "cpu"), kind=None)


def _preprocess_items(
    items: list[object], config: PreprocessConfig | None, device: torch.device, *, kind: Kind | None
) -> Patches:
    config = config or PreprocessConfig()
    frames_per_item: list[torch.Tensor] = []
    plans: list[ItemPlan] = []
    for index, item in enumerate(items):
        label = kind if kind is not None else f"item {index}"
        frames, item_kind = as_frames(item, config, kind=kind, label=label)  # (F, H, W, 3)
        num_frames, height, width, _ = frames.shape
        if item_kind == "image":
            plan = plan_image(height, width, config)
        else:
            plan = plan_video(num_frames, height, width, config)
        frames_per_item.append(frames)
        plans.append(plan)

    row_offsets = [0]
    for plan in plans:
        row_offsets.append(row_offsets[-1] + plan.num_patches)
    pixel_values = torch.empty(row_offsets[-1], config.patch_dim, dtype=torch.float32, device=device)

    for (target_height, target_width, padded_height, padded_width), members in _group_by_size(plans):
        stacked = _upload([frames_per_item[index] for index in members], device)  # (sum F, H, W, 3)
        # channels-first view of channels-last memory: the native kernel takes it as is
        resized = resize_uint8(stacked.permute(0, 3, 1, 2), target_height, target_width)  # (sum F, 3, h, w)
        resized = pad_bottom_right(resized, padded_height, padded_width)  # (the navit rule's zeros)
        first_frame = 0
        for run in _runs_of_equal_frames(members, plans):
            count = len(run) * plans[run[0]].frames
            run_frames = resized[first_frame : first_frame + count]  # (B*F, 3, h, w)
            run_frames = run_frames.unflatten(0, (len(run), -1))  # (B, F, 3, h, w)
            rows = pixel_values[row_offsets[run[0]] : row_offsets[run[-1] + 1]]  # (B*t*h*w, C*T*P*P)
            patchify_into(run_frames, rows, config)
            first_frame += count

    normalize_(pixel_values, config)
    grids = [[plan.grid_t, plan.grid_h, plan.grid_w] for plan in plans]
    grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)  # (items, 3)
    return Patches(pixel_values, grid_thw)


def _upload(frames: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One tensor of all frames on `device`; host frames go up in one pinned, asynchronous copy."""
    on_host = all(item.device.type == "cpu" for item in frames)
    if device.type == "cuda" and on_host:
        # The caching host allocator recycles the pinned block once the copy has finished.
        staging = torch.empty((sum(item.shape[0] for item in frames), *frames[0].shape[1:]),
                              dtype=torch.uint8, pin_memory=True)  # (sum F, H, W, 3)
        torch.cat(frames, out=staging)
        return staging.to(device, non_blocking=True)
    uploaded = [item.to(device) for item in frames]  # each (F, H, W, 3)
    return uploaded[0] if len(uploaded) == 1 else torch.cat(uploaded)


def _runs_of_equal_frames(members: list[int], plans: list[ItemPlan]) -> list[list[int]]:
    """Split a group into runs of adjacent items with equal frame counts: each run's rows are
    contiguous in the output and its frames in the group, so one patchify call serves it."""
    runs: list[list[int]] = []
    for index in members:
        if runs and index == runs[-1][-1] + 1 and plans[index].frames == plans[runs[-1][-1]].frames:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _group_by_size(plans: list[ItemPlan]) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """(resized and padded size, item indices) for each set of items with equal input, resized and padded
    sizes."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, plan in enumerate(plans):
        key = (plan.height, plan.width, plan.resized_height, plan.resized_width, plan.padded_height, plan.padded_width)
        groups.setdefault(key, []).append(index)
    return [(key[2:], members) for key, members in groups.items()]
