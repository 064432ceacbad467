"""Resized sizes and patch grids: Qwen's smart_resize for images and for videos (GLM-4.xV's images:
the video rule, as a clip of one temporal patch), or Kimi K2.5's navit rule (navit.py) for both.

The arithmetic (Python's banker's `round`, float `sqrt`, floor/ceil on the same
expressions) follows the Hugging Face Qwen2-VL / Qwen3-VL processors operation for
operation, because a one-pixel difference in the resized size changes the token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitserve.preprocess.config import PreprocessConfig
from vitserve.preprocess.errors import PreprocessError
from vitserve.preprocess.navit import navit_most_patches, navit_resize

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ItemPlan:
    """One image or video: its input size, resized size, padded size and patch grid."""

    is_video: bool
    frames: int  # input frames; 1 for an image
    height: int
    width: int
    resized_height: int
    resized_width: int
    padded_height: int  # the resized frame with zeros below and to the right (navit); else the resized size
    padded_width: int
    grid_t: int
    grid_h: int
    grid_w: int

    @property
    def num_patches(self) -> int:
        return self.grid_t * self.grid_h * self.grid_w

    @property
    def needs_resize(self) -> bool:
        return (self.resized_height, self.resized_width) != (self.height, self.width)


def check_aspect_ratio(height: int, width: int) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise PreprocessError(
            f"aspect ratio {ratio:.1f} (H×W = {height}×{width}) is over {MAX_ASPECT_RATIO}; "
            f"crop or pad the input so that the long side is at most {MAX_ASPECT_RATIO}× the short side"
        )


def smart_resize_image(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min <= h*w <= max pixels."""
    check_aspect_ratio(height, width)
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        shrink = math.sqrt((height * width) / max_pixels)
        resized_height = max(factor, math.floor(height / shrink / factor) * factor)
        resized_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * grow / factor) * factor
        resized_width = math.ceil(width * grow / factor) * factor
    return resized_height, resized_width


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """Per-frame (height, width) for a clip; the pixel limits apply to frames*h*w.

    Differs from the image rule as Qwen3-VL's video processor does: sides shorter than
    `factor` are first scaled up (keeping the aspect ratio), and the limits count frames.
    """
    if num_frames < temporal_factor:
        raise PreprocessError(
            f"a video needs at least {temporal_factor} frames for the resize rule, got {num_frames}"
        )
    if height < factor or width < factor:
        upscale = max(factor / height, factor / width)
        height = int(height * upscale)
        width = int(width * upscale)
    check_aspect_ratio(height, width)
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    rounded_frames = round(num_frames / temporal_factor) * temporal_factor
    if rounded_frames * resized_height * resized_width > max_pixels:
        shrink = math.sqrt((num_frames * height * width) / max_pixels)
        resized_height = max(factor, math.floor(height / shrink / factor) * factor)
        resized_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif rounded_frames * resized_height * resized_width < min_pixels:
        grow = math.sqrt(min_pixels / (num_frames * height * width))
        resized_height = math.ceil(height * grow / factor) * factor
        resized_width = math.ceil(width * grow / factor) * factor
    return resized_height, resized_width


def plan_image(height: int, width: int, config: PreprocessConfig) -> ItemPlan:
    """With `image_resize_as_clip` (GLM-4.xV), the image is sized as the clip of one temporal patch
    that repeats it, as Glm4vImageProcessor does; with the navit rule as Kimi_K25ImageProcessor does;
    otherwise by Qwen's image rule."""
    if config.resize_rule == "navit":
        return _navit_plan(1, height, width, config, is_video=False)
    if config.image_resize_as_clip:
        resized_height, resized_width = smart_resize_video(
            config.temporal_patch_size,
            height,
            width,
            temporal_factor=config.temporal_patch_size,
            factor=config.factor,
            min_pixels=config.image_min_pixels,
            max_pixels=config.image_max_pixels,
        )
    else:
        resized_height, resized_width = smart_resize_image(
            height,
            width,
            factor=config.factor,
            min_pixels=config.image_min_pixels,
            max_pixels=config.image_max_pixels,
        )
    return ItemPlan(
        is_video=False,
        frames=1,
        height=height,
        width=width,
        resized_height=resized_height,
        resized_width=resized_width,
        padded_height=resized_height,
        padded_width=resized_width,
        grid_t=1,  # the single frame is repeated to fill one temporal patch
        grid_h=resized_height // config.patch_size,
        grid_w=resized_width // config.patch_size,
    )


def video_pixel_limit(num_frames: int, config: PreprocessConfig) -> int:
    """The limit on frames * h * w of a clip: video_max_pixels, or with the per-frame cap (as
    Hugging Face's cap_pixels_per_frame computes it) the capped share of every frame."""
    if not config.video_cap_pixels_per_frame:
        return config.video_max_pixels
    frame_cap = config.video_max_frame_tokens * config.factor * config.factor
    per_frame = max(min(frame_cap, config.video_max_pixels // num_frames), int(config.video_min_pixels * 1.05))
    return per_frame * num_frames


def plan_video(frames: int, height: int, width: int, config: PreprocessConfig) -> ItemPlan:
    """A clip shorter than one temporal patch is sized as the padded clip (its last frame repeated). With
    the navit rule every frame is sized as Kimi_K25VideoProcessor sizes it, by the per-frame limit."""
    if config.resize_rule == "navit":
        return _navit_plan(frames, height, width, config, is_video=True)
    temporal = config.temporal_patch_size
    num_frames = max(frames, temporal)
    resized_height, resized_width = smart_resize_video(
        num_frames,
        height,
        width,
        temporal_factor=temporal,
        factor=config.factor,
        min_pixels=config.video_min_pixels,
        max_pixels=video_pixel_limit(num_frames, config),
    )
    return ItemPlan(
        is_video=True,
        frames=frames,
        height=height,
        width=width,
        resized_height=resized_height,
        resized_width=resized_width,
        padded_height=resized_height,
        padded_width=resized_width,
        grid_t=-(-frames // temporal),  # frames padded up to a multiple of the temporal patch
        grid_h=resized_height // config.patch_size,
        grid_w=resized_width // config.patch_size,
    )


def _navit_plan(frames: int, height: int, width: int, config: PreprocessConfig, *, is_video: bool) -> ItemPlan:
    """The grid covers the padded frame; a video's frames are its grid_t (with temporal_patch_size 1). No
    aspect-ratio limit: the rule never scales a side below one pixel, and Kimi K2.5's processor has none."""
    (resized_height, resized_width), (padded_height, padded_width) = navit_resize(
        height,
        width,
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        max_patches=config.video_frame_max_patches if is_video else config.image_max_patches,
        max_patches_per_side=config.max_patches_per_side,
    )
    return ItemPlan(
        is_video=is_video,
        frames=frames,
        height=height,
        width=width,
        resized_height=resized_height,
        resized_width=resized_width,
        padded_height=padded_height,
        padded_width=padded_width,
        grid_t=-(-frames // config.temporal_patch_size),
        grid_h=padded_height // config.patch_size,
        grid_w=padded_width // config.patch_size,
    )


def largest_item_tokens(config: PreprocessConfig) -> int:
    """The most patch tokens the resize rules give one item under `config`: an engine that admits
    this many admits everything the model's processor accepts (within max_video_frames).

    Per frame, a resized size is within one of three bounds. Shrunk to fit: at most the frame's
    share of max_pixels, unless the short side is clamped up to one factor, when the long side
    stays within sqrt(share * aspect ratio). Grown to min_pixels: the share of min_pixels plus
    one factor of rounding on each side. Neither: within the limit already. A clip of N frames
    has ceil(N / temporal) temporal patches; the bound is taken over every N. An image sized as a
    clip (`image_resize_as_clip`) is that clip's one temporal patch: T frames that round to T, so
    its frame's shares are the image limits over T (the upscale of tiny sides comes before the rule
    and keeps the aspect ratio within the same bound, which the rule checks after it). The navit rule
    sizes each frame alone: navit_most_patches per image, and per frame times a video's temporal patches.
    """
    if config.resize_rule == "navit":
        return _navit_largest_item_tokens(config)
    f, patch, ratio = config.factor, config.patch_size, MAX_ASPECT_RATIO
    edge = math.sqrt(ratio) + 1 / math.sqrt(ratio)  # the most (H + W) / sqrt(H * W) can be

    def frame_pixels(max_share: float, min_share: float) -> float:
        clamped = f * math.sqrt(max_share * ratio) + f * f
        grown = min_share + f * edge * math.sqrt(min_share) + f * f
        return max(max_share, clamped, grown)

    temporal = config.temporal_patch_size
    image_frames = temporal if config.image_resize_as_clip else 1
    image = frame_pixels(config.image_max_pixels / image_frames, config.image_min_pixels / image_frames)
    video = 0.0
    for frames in range(temporal, max(config.max_video_frames, temporal) + 1):
        rounded = max(round(frames / temporal) * temporal, temporal)  # the resize rule's frame count
        share = frame_pixels(video_pixel_limit(frames, config) / min(frames, rounded), config.video_min_pixels / frames)
        video = max(video, -(-frames // temporal) * share)
    return int(max(image, video) // patch**2)


def _navit_largest_item_tokens(config: PreprocessConfig) -> int:
    limits = dict(patch_size=config.patch_size, merge_size=config.merge_size,
                  max_patches_per_side=config.max_patches_per_side,
                  max_short_side=math.isqrt(config.max_input_pixels))  # the shorter side of any input
    image = navit_most_patches(max_patches=config.image_max_patches, **limits)
    frame = navit_most_patches(max_patches=config.video_frame_max_patches, **limits)
    return max(image, -(-config.max_video_frames // config.temporal_patch_size) * frame)
