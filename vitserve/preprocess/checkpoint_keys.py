"""The keys of a checkpoint's preprocessor_config.json and video_preprocessor_config.json, as PreprocessConfig
values: Qwen-style processors' (Qwen3-VL, GLM-4.xV) and Kimi K2.5's. Keys a family does not use are ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# The only rescale factor the fused normalisation implements (uint8 -> [0, 1]).
RESCALE_FACTOR = 1 / 255
IMAGE_FILE, VIDEO_FILE = "preprocessor_config.json", "video_preprocessor_config.json"


def read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"{path} not found; a checkpoint directory holds preprocessor_config.json "
                "(Hugging Face saves it with the processor)"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or replace the file") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def qwen_values(image_json: dict[str, Any], video_json: dict[str, Any]) -> dict[str, Any]:
    """size.shortest_edge / size.longest_edge (or min_pixels / max_pixels, which win, as in Hugging Face),
    patch_size, temporal_patch_size, merge_size, image_mean, image_std, and the video file's max_frames,
    cap_pixels_per_frame and max_video_tokens."""
    values = _shared(image_json, video_json, ("patch_size", "temporal_patch_size", "merge_size"))
    image_low, image_high = _pixel_limits(image_json)
    video_low, video_high = _pixel_limits(video_json)
    optional = {
        "image_min_pixels": image_low,
        "image_max_pixels": image_high,
        "video_min_pixels": video_low,
        "video_max_pixels": video_high,
        "max_video_frames": video_json.get("max_frames"),
        "video_cap_pixels_per_frame": video_json.get("cap_pixels_per_frame"),
        "video_max_frame_tokens": video_json.get("max_video_tokens"),
    }
    values.update({key: value for key, value in optional.items() if value is not None})
    return values


def kimi_values(image_json: dict[str, Any], video_json: dict[str, Any]) -> dict[str, Any]:
    """Kimi K2.5's keys in either layout.

    Hugging Face's Kimi_K25ImageProcessor / Kimi_K25VideoProcessor: max_patches (the image file's per image,
    the video file's per frame), size.max_height / size.max_width (patches a side; equal, as the processors
    require), patch_size, merge_size, image_mean, image_std. The released checkpoint's own processor (remote
    code): one media_proc_cfg (nested, or its keys at the top level) with in_patch_limit (images),
    in_patch_limit_each_frame (video frames; null: in_patch_limit), patch_limit_on_one_side, merge_kernel_size,
    patch_size, image_mean, image_std and max_num_frames_each_video. The video's temporal_patch_size /
    temporal_merge_kernel_size (4) is the tower's chunk of frames, not a patch of pixels: a video stays one item
    of one frame per row, so it is not read here.
    """
    image_json, video_json = _media_proc_cfg(image_json), _media_proc_cfg(video_json)
    for source, name in ((image_json, IMAGE_FILE), (video_json, VIDEO_FILE)):
        if source.get("in_patch_limit_video") is not None:
            raise ValueError(
                f"{name}: in_patch_limit_video {source['in_patch_limit_video']!r} (a patch limit over a whole video) "
                "is not supported; vitserve sizes every frame by in_patch_limit_each_frame: set it to null"
            )
        for key in ("merge_kernel_size", "patch_limit_on_one_side", "size"):
            if key in source:
                source[key] = _one_value(source.pop(key), key, name)
                if source[key] is None:  # (no max_height / max_width: another processor's size)
                    del source[key]
    for source in (image_json, video_json):
        if "merge_kernel_size" in source:
            source.setdefault("merge_size", source.pop("merge_kernel_size"))
        if "patch_limit_on_one_side" in source:
            source.setdefault("size", source.pop("patch_limit_on_one_side"))
    values = _shared(image_json, video_json, ("patch_size", "merge_size", "size"))
    if "size" in values:
        values["max_patches_per_side"] = values.pop("size")
    image_patches = image_json.get("max_patches", image_json.get("in_patch_limit"))
    frame_patches = video_json.get("max_patches", image_json.get("in_patch_limit_each_frame"))
    if frame_patches is None and "in_patch_limit" in image_json:  # the remote code's fallback
        frame_patches = image_json["in_patch_limit"]
    optional = {
        "image_max_patches": image_patches,
        "video_frame_max_patches": frame_patches,
        "max_video_frames": image_json.get("max_num_frames_each_video"),
    }
    values.update({key: value for key, value in optional.items() if value is not None})
    return values


def _media_proc_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """The remote-code processor keeps its settings in media_proc_cfg; a copy with them at the top level."""
    nested = config.get("media_proc_cfg")
    return {**config, **nested} if isinstance(nested, dict) else dict(config)


def _one_value(value: Any, key: str, file_name: str) -> Any:
    """Kimi's square settings as one number: size {max_height, max_width}, merge_kernel_size [k, k]."""
    if isinstance(value, dict):
        value = [value.get("max_height"), value.get("max_width")]
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{file_name}: {key} {value!r} must be square (two equal numbers, as the Kimi "
                             "processors require); make them equal")
        return value[0]
    return value


def _shared(image_json: dict[str, Any], video_json: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Keys that vitserve keeps once for images and videos (with the mean and std): the files must agree."""
    values: dict[str, Any] = {}
    for source in (image_json, video_json):
        for key in (*keys, "image_mean", "image_std"):
            if key not in source:
                continue
            if key in values and values[key] != source[key]:
                raise ValueError(
                    f"{key} differs between {IMAGE_FILE} ({values[key]!r}) and {VIDEO_FILE} ({source[key]!r}); "
                    "vitserve uses one value for both, so make them equal"
                )
            values[key] = source[key]
        _check_rescale_factor(source)
    return values


def _pixel_limits(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(min, max) resized pixels; top-level min_pixels/max_pixels override `size`, as in HF."""
    size = config.get("size")
    size = size if isinstance(size, dict) else {}
    low = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    high = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    return low, high


def _check_rescale_factor(config: dict[str, Any]) -> None:
    factor = config.get("rescale_factor")
    if factor is None:
        return
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isclose(
        factor, RESCALE_FACTOR, rel_tol=1e-9
    ):
        raise ValueError(
            f"rescale_factor {factor!r} is not supported; vitserve normalises uint8 pixels with 1/255"
        )
