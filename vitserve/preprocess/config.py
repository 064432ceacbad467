"""PreprocessConfig: the processor settings (Qwen3-VL's or GLM-4.xV's), validated, and read from a checkpoint."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

# The released Qwen3-VL checkpoints' preprocessor_config.json and
# video_preprocessor_config.json; the class defaults of the Hugging Face processors differ.
_IMAGE_MIN_PIXELS = 65536
_IMAGE_MAX_PIXELS = 16777216
_VIDEO_MIN_PIXELS = 4096
_VIDEO_MAX_PIXELS = 25165824
# GLM-4.1V / 4.5V / 4.6V: the Hugging Face Glm4v (and Glm46V) image and video processors' class defaults
# (a checkpoint's own files, read over these, win): patch 14 and OpenAI CLIP's mean/std; images are sized
# by the clip rule as two frames (Glm4vImageProcessor.resize calls smart_resize with num_frames=2), which
# no processor file records: it comes from the family alone.
GLM_MODEL_TYPES = ("glm4v", "glm4v_moe", "glm46v", "glm4v_vision", "glm4v_moe_vision")
_GLM_VALUES = dict(
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
_GLM46V_MAX_VIDEO_FRAMES = 640
MAX_VIDEO_FRAMES = 65536  # the largest max_video_frames (the engine's item bound walks every clip length)
# The only rescale factor the fused normalisation implements (uint8 -> [0, 1]).
_RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class PreprocessConfig:
    """How images and videos become patches; defaults are the released Qwen3-VL values (the
    released GLM-4.xV values: `released_preprocess`).

    Pixel limits are in resized pixels (images: per image; videos: over all frames), as in
    the Hugging Face processors' `size` dict. `video_cap_pixels_per_frame` applies the reference
    code's (qwen-vl-utils') per-frame cap, as Hugging Face's `cap_pixels_per_frame` does: each
    frame gets at most `video_max_frame_tokens` merged patches, or its even share of
    video_max_pixels, and at least 1.05 * video_min_pixels. Frames arrive sampled: the caller picks
    them (at the checkpoint's fps). `max_input_pixels` limits the raw H*W of each image or frame
    and `max_video_frames` the frames of one video: both protect the server from inputs it
    cannot afford. `image_resize_as_clip`: images are sized by the clip rule as `temporal_patch_size`
    frames (GLM-4.xV): sides under one merged patch are first scaled up, and the image pixel limits
    count every frame of the temporal patch, so an image gets about a temporal_patch_size-th of them.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = _IMAGE_MIN_PIXELS
    image_max_pixels: int = _IMAGE_MAX_PIXELS
    video_min_pixels: int = _VIDEO_MIN_PIXELS
    video_max_pixels: int = _VIDEO_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_input_pixels: int = 2**27
    max_video_frames: int = 768
    video_cap_pixels_per_frame: bool = False
    video_max_frame_tokens: int = 768  # with the cap; Hugging Face's max_video_tokens
    image_resize_as_clip: bool = False

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_min_pixels",
            "image_max_pixels",
            "video_min_pixels",
            "video_max_pixels",
            "max_input_pixels",
            "max_video_frames",
            "video_max_frame_tokens",
        ):
            _require_positive_int(name, getattr(self, name))
        if self.max_video_frames > MAX_VIDEO_FRAMES:
            raise ValueError(f"PreprocessConfig.max_video_frames ({self.max_video_frames}) is over {MAX_VIDEO_FRAMES} "
                             "(9 hours at 2 fps): sample fewer frames")
        for name in ("video_cap_pixels_per_frame", "image_resize_as_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PreprocessConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for kind in ("image", "video"):
            low, high = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if low > high:
                raise ValueError(
                    f"PreprocessConfig.{kind}_min_pixels ({low}) is larger than "
                    f"{kind}_max_pixels ({high}); make min_pixels <= max_pixels"
                )
        # frozen: normalise list inputs (as read from JSON) to tuples through object.__setattr__
        object.__setattr__(self, "image_mean", _channel_triple("image_mean", self.image_mean))
        object.__setattr__(self, "image_std", _channel_triple("image_std", self.image_std))
        if any(value <= 0 for value in self.image_std):
            raise ValueError(
                f"PreprocessConfig.image_std must be positive in every channel, got {self.image_std}"
            )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged patch, in pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Columns of pixel_values: C * T * P * P (1536 for Qwen3-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], base: PreprocessConfig | None = None
    ) -> PreprocessConfig:
        """Read preprocessor_config.json (and video_preprocessor_config.json if present) over `base`.

        Keys understood: size.shortest_edge / size.longest_edge (or min_pixels /
        max_pixels, which win, as in Hugging Face), patch_size, temporal_patch_size,
        merge_size, image_mean, image_std, and the video file's max_frames,
        cap_pixels_per_frame and max_video_tokens. Anything missing keeps its value in `base`:
        by default the released values of the checkpoint's family (config.json's model_type;
        Qwen3-VL's without a config.json), since the files leave out what the processor class
        fixes (GLM-4.xV's image rule, its mean/std when a file omits them).
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {str(root)!r} does not exist or is not a directory; "
                "pass the folder that holds preprocessor_config.json"
            )
        if base is None:
            base = released_preprocess(checkpoint_model_type(root))
        image_json = _read_json(root / "preprocessor_config.json", required=True)
        video_json = _read_json(root / "video_preprocessor_config.json", required=False)

        values: dict[str, Any] = {}
        for source in (image_json, video_json):
            for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
                if key not in source:
                    continue
                if key in values and values[key] != source[key]:
                    raise ValueError(
                        f"{key} differs between preprocessor_config.json ({values[key]!r}) and "
                        f"video_preprocessor_config.json ({source[key]!r}); vitserve uses one "
                        "value for both, so make them equal"
                    )
                values[key] = source[key]
            _check_rescale_factor(source)
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
        known = {field.name for field in fields(cls)}
        return replace(base, **{key: value for key, value in values.items() if key in known})


def released_preprocess(model_type: str | None) -> PreprocessConfig:
    """The released preprocessing of a Hugging Face model_type's family: GLM-4.xV's for GLM_MODEL_TYPES,
    Qwen3-VL's (`PreprocessConfig()`) for everything else, and for None (no config.json)."""
    if model_type not in GLM_MODEL_TYPES:
        return PreprocessConfig()
    frames = _GLM46V_MAX_VIDEO_FRAMES if model_type == "glm46v" else PreprocessConfig.max_video_frames
    return PreprocessConfig(**_GLM_VALUES, max_video_frames=frames)


def preprocess_family(model_type: str | None) -> str:
    """The family whose processor a model_type's preprocessing follows, for messages."""
    return "GLM-4.xV" if model_type in GLM_MODEL_TYPES else "Qwen3-VL"


def checkpoint_model_type(directory: str | os.PathLike[str]) -> str | None:
    """The model_type in a checkpoint directory's config.json; None without the file or the key."""
    model_type = _read_json(Path(directory) / "config.json", required=False).get("model_type")
    return model_type if isinstance(model_type, str) else None


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"PreprocessConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"PreprocessConfig.{name} must be at least 1, got {value}")


def _channel_triple(name: str, value: object) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"PreprocessConfig.{name} must hold 3 numbers (one per RGB channel), got {value!r}")
    triple = tuple(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in triple):
        raise ValueError(f"PreprocessConfig.{name} must hold 3 finite numbers, got {value!r}")
    return (float(triple[0]), float(triple[1]), float(triple[2]))


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
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
        factor, _RESCALE_FACTOR, rel_tol=1e-9
    ):
        raise ValueError(
            f"rescale_factor {factor!r} is not supported; vitserve normalises uint8 pixels with 1/255"
        )
