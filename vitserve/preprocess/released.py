"""The released preprocessing of each model family: the PreprocessConfig values (over the Qwen3-VL defaults)
that a family's Hugging Face processors use, by the model_type in a checkpoint's config.json.

Plain values only (PreprocessConfig is built from them in config.py), so that this module imports nothing.
"""

from __future__ import annotations

from typing import Any

QWEN_FAMILY = "Qwen3-VL"  # the defaults of PreprocessConfig: every model_type not listed below

# GLM-4.1V / 4.5V / 4.6V: the Hugging Face Glm4v (and Glm46V) image and video processors' class defaults
# (a checkpoint's own files, read over these, win): patch 14 and OpenAI CLIP's mean/std; images are sized
# by the clip rule as two frames (Glm4vImageProcessor.resize calls smart_resize with num_frames=2), which
# no processor file records: it comes from the family alone.
GLM_FAMILY = "GLM-4.xV"
GLM_MODEL_TYPES = ("glm4v", "glm4v_moe", "glm46v", "glm4v_vision", "glm4v_moe_vision")
GLM_VALUES: dict[str, Any] = dict(
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_min_pixels=112 * 112,
    image_max_pixels=28 * 28 * 15000,
    video_min_pixels=112 * 112,
    video_max_pixels=28 * 28 * 2 * 30000,
    image_mean=(0.48145466, 0.4578275, 0.40821073),  # transformers' OPENAI_CLIP_MEAN
    image_std=(0.26862954, 0.26130258, 0.27577711),  # transformers' OPENAI_CLIP_STD
    image_resize_as_clip=True,
)
# Glm46VVideoProcessor.sample_frames takes at most 640 frames (MAX_FRAME_COUNT_DYNAMIC), whatever the fps.
# GLM-4.1V's sampler (Glm4vVideoProcessor, GLM-4.5V's too) takes up to max_duration (300 s) * fps frames,
# 600 at its default 2 fps, but the fps is the caller's: no fixed bound, so those keep the Qwen3-VL
# default of 768 (as do bare glm4v_vision towers, whose model_type GLM-4.6V's vision config shares).
GLM46V_VALUES: dict[str, Any] = dict(GLM_VALUES, max_video_frames=640)

# Kimi K2.5 (and K2.6, the same model_type): Hugging Face's Kimi_K25ImageProcessor and Kimi_K25VideoProcessor
# class defaults, which are also the released checkpoint's media_proc_cfg (in_patch_limit 16384,
# in_patch_limit_each_frame 4096, patch_limit_on_one_side 512, mean/std 0.5). Patch 14 in one frame: no
# temporal patch in the pixels (the tower averages a chunk of 4 frames after its blocks), rows in raster
# order; sizes are never scaled up and are padded with zeros to multiples of 28. The video processor samples
# at 2 fps without a frame limit, but the fps is the caller's: the Qwen3-VL default of 768 frames stays.
KIMI_FAMILY = "Kimi K2.5"
KIMI_MODEL_TYPES = ("kimi_k25", "kimi_k25_vision")
KIMI_VALUES: dict[str, Any] = dict(
    patch_size=14,
    temporal_patch_size=1,
    merge_size=2,
    image_mean=(0.5, 0.5, 0.5),  # transformers' IMAGENET_STANDARD_MEAN
    image_std=(0.5, 0.5, 0.5),  # transformers' IMAGENET_STANDARD_STD
    resize_rule="navit",
    image_max_patches=16384,
    video_frame_max_patches=4096,
    max_patches_per_side=512,
    raster_patches=True,
)


def family_values(model_type: str | None) -> tuple[str, dict[str, Any]]:
    """(family name, PreprocessConfig values over the defaults) of a model_type; Qwen3-VL's (no values)
    for every other model_type and for None (a checkpoint without config.json)."""
    if model_type in KIMI_MODEL_TYPES:
        return KIMI_FAMILY, KIMI_VALUES
    if model_type == "glm46v":
        return GLM_FAMILY, GLM46V_VALUES
    if model_type in GLM_MODEL_TYPES:
        return GLM_FAMILY, GLM_VALUES
    return QWEN_FAMILY, {}
