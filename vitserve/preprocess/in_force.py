"""The preprocessing in force for a model: the checkpoint's processor configs when it has them, the
released Qwen3-VL values otherwise, and settings given explicitly over either; and the line that
says so when an engine starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import PreprocessConfig

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def checkpoint_files(source: str | Path) -> list[Path]:
    """The processor configs in a checkpoint directory (none for a preset or a directory without them;
    the video file counts only beside the image one, which from_pretrained requires)."""
    directory = Path(source)
    if not directory.is_dir() or not (directory / PROCESSOR_FILES[0]).is_file():
        return []
    return [directory / name for name in PROCESSOR_FILES if (directory / name).is_file()]


def preprocess_for(source: str | Path, overrides: dict[str, Any] | None = None) -> PreprocessConfig:
    """The checkpoint's preprocessing (or the released defaults), with `overrides` (field -> value; None
    values are left out) over it. ValueError naming the file or the setting when one is wrong."""
    try:
        base = PreprocessConfig.from_pretrained(source) if checkpoint_files(source) else PreprocessConfig()
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise ValueError(f"the checkpoint's preprocessing: {err}") from None
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    return dataclasses.replace(base, **given) if given else base


def overridden(config: PreprocessConfig, source: str | Path) -> list[str]:
    """The settings of `config` that differ from the source's own (its checkpoint's, or the defaults)."""
    own = preprocess_for(source)
    return [field.name for field in dataclasses.fields(config) if getattr(config, field.name) != getattr(own, field.name)]


def describe(config: PreprocessConfig, source: str | Path, overridden: list[str] = ()) -> str:
    """Which preprocessing values are in force and where they come from (`overridden`: the names of
    what was given over the source's own), in one line."""
    files = checkpoint_files(source)
    origin = " and ".join(path.name for path in files) if files else "the released Qwen3-VL defaults"
    if overridden:
        origin += f", overridden by {', '.join(overridden)}"
    cap = (f"each frame at most {config.video_max_frame_tokens} merged patches (per-frame cap)"
           if config.video_cap_pixels_per_frame else "no per-frame cap")
    return (f"preprocessing from {origin}: image pixels {config.image_min_pixels}..{config.image_max_pixels}; "
            f"video pixels {config.video_min_pixels}..{config.video_max_pixels} over a clip's frames, {cap}, "
            f"at most {config.max_video_frames} frames; patch {config.patch_size}, merge {config.merge_size}, "
            f"temporal patch {config.temporal_patch_size}; mean {list(config.image_mean)}, std {list(config.image_std)}")
