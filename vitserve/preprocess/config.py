"""PreprocessConfig: the processor settings (Qwen3-VL's, GLM-4.xV's or Kimi K2.5's), validated, and read from a
checkpoint."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .checkpoint_keys import IMAGE_FILE, VIDEO_FILE, kimi_values, qwen_values, read_json
from .released import family_values

# The released Qwen3-VL checkpoints' preprocessor_config.json and
# video_preprocessor_config.json; the class defaults of the Hugging Face processors differ.
_IMAGE_MIN_PIXELS = 65536
_IMAGE_MAX_PIXELS = 16777216
_VIDEO_MIN_PIXELS = 4096
_VIDEO_MAX_PIXELS = 25165824
MAX_VIDEO_FRAMES = 65536  # the largest max_video_frames (the engine's item bound walks every clip length)
# How sizes are chosen: Qwen's smart_resize (rounded to merged patches within pixel limits, scaled up or down),
# or Kimi K2.5's NaViT rule (never scaled up, within patch limits, padded with zeros to merged patches).
RESIZE_RULES = ("smart_resize", "navit")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images and videos become patches; defaults are the released Qwen3-VL values (the
    released GLM-4.xV and Kimi K2.5 values: `released_preprocess`).

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

    `resize_rule` "navit" (Kimi K2.5) replaces the pixel limits above by patch limits, counted in whole
    patches of the input (H // patch * W // patch): an image is scaled down (never up) to at most
    `image_max_patches` and each video frame to at most `video_frame_max_patches`, each side to at most
    `max_patches_per_side` patches, sides truncated to whole pixels; then zeros are added at the bottom and
    right up to multiples of one merged patch (the padding is part of the grid: its rows hold
    normalised zeros). `raster_patches`: each frame's patches in row-major order, one frame per row (so
    temporal_patch_size must be 1), instead of the merger's m x m blocks; a video's grid_t is its frames.
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
    resize_rule: str = "smart_resize"  # one of RESIZE_RULES
    image_max_patches: int = 16384  # with the navit rule (as the three below): Kimi K2.5's values
    video_frame_max_patches: int = 4096
    max_patches_per_side: int = 512
    raster_patches: bool = False

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
            "image_max_patches",
            "video_frame_max_patches",
            "max_patches_per_side",
        ):
            _require_positive_int(name, getattr(self, name))
        if self.max_video_frames > MAX_VIDEO_FRAMES:
            raise ValueError(f"PreprocessConfig.max_video_frames ({self.max_video_frames}) is over {MAX_VIDEO_FRAMES} "
                             "(9 hours at 2 fps): sample fewer frames")
        for name in ("video_cap_pixels_per_frame", "image_resize_as_clip", "raster_patches"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PreprocessConfig.{name} must be true or false, got {getattr(self, name)!r}")
        self._check_rules()
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

    def _check_rules(self) -> None:
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"PreprocessConfig.resize_rule must be 'smart_resize' (Qwen3-VL, GLM-4.xV) or 'navit' "
                             f"(Kimi K2.5), got {self.resize_rule!r}")
        if self.resize_rule == "navit":
            for name in ("image_resize_as_clip", "video_cap_pixels_per_frame"):
                if getattr(self, name):
                    raise ValueError(f"PreprocessConfig.{name} belongs to the smart_resize rule; with resize_rule "
                                     "'navit' set it to false (the navit rule limits patches: image_max_patches, "
                                     "video_frame_max_patches, max_patches_per_side)")
        if self.raster_patches and self.temporal_patch_size != 1:
            raise ValueError(f"PreprocessConfig.raster_patches puts one frame in each row, so temporal_patch_size "
                             f"must be 1, got {self.temporal_patch_size}; set temporal_patch_size=1 or "
                             "raster_patches=false")

    @property
    def factor(self) -> int:
        """Resized (navit: padded) sides are multiples of this: one merged patch, in pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Columns of pixel_values: C * T * P * P (1536 for Qwen3-VL, 588 for Kimi K2.5)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], base: PreprocessConfig | None = None
    ) -> PreprocessConfig:
        """Read preprocessor_config.json (and video_preprocessor_config.json if present) over `base`.

        Keys understood: checkpoint_keys.qwen_values's, or with the navit rule (Kimi K2.5)
        checkpoint_keys.kimi_values's. Anything missing keeps its value in `base`: by default the
        released values of the checkpoint's family (config.json's model_type; Qwen3-VL's without a
        config.json), since the files leave out what the processor class fixes (GLM-4.xV's image rule,
        Kimi K2.5's rule and layout, a mean/std a file omits).
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {str(root)!r} does not exist or is not a directory; "
                "pass the folder that holds preprocessor_config.json"
            )
        if base is None:
            base = released_preprocess(checkpoint_model_type(root))
        image_json = read_json(root / IMAGE_FILE, required=True)
        video_json = read_json(root / VIDEO_FILE, required=False)
        values = (kimi_values if base.resize_rule == "navit" else qwen_values)(image_json, video_json)
        known = {field.name for field in fields(cls)}
        try:
            return replace(base, **{key: value for key, value in values.items() if key in known})
        except ValueError as error:
            files = " and ".join(name for name in (IMAGE_FILE, VIDEO_FILE) if (root / name).is_file())
            raise ValueError(f"{error} (as read from {files}: fix the value there)") from None


def released_preprocess(model_type: str | None) -> PreprocessConfig:
    """The released preprocessing of a Hugging Face model_type's family (released.py): GLM-4.xV's, Kimi
    K2.5's, and Qwen3-VL's (`PreprocessConfig()`) for everything else and for None (no config.json)."""
    return PreprocessConfig(**family_values(model_type)[1])


def preprocess_family(model_type: str | None) -> str:
    """The family whose processor a model_type's preprocessing follows, for messages."""
    return family_values(model_type)[0]


def checkpoint_model_type(directory: str | os.PathLike[str]) -> str | None:
    """The model_type in a checkpoint directory's config.json; None without the file or the key."""
    model_type = read_json(Path(directory) / "config.json", required=False).get("model_type")
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
