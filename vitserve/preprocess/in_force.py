"""The preprocessing in force for a model: the checkpoint's processor configs when it has them, the
released values of its family (Qwen3-VL's, GLM-4.xV's or Kimi K2.5's) otherwise, and settings given explicitly over
either; and the line that says so when an engine starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import PreprocessConfig, checkpoint_model_type, preprocess_family, released_preprocess

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
PRESET_PREFIX = "random:"  # vitserve.models.presets.PRESET_PREFIX (not imported: vitserve.models imports us)


def checkpoint_files(source: str | Path) -> list[Path]:
    """The processor configs in a checkpoint directory (none for a preset or a directory without them;
    the video file counts only beside the image one, which from_pretrained requires)."""
    directory = Path(source)
    if not directory.is_dir() or not (directory / PROCESSOR_FILES[0]).is_file():
        return []
    return [directory / name for name in PROCESSOR_FILES if (directory / name).is_file()]


def source_model_type(source: str | Path) -> str | None:
    """Hugging Face's model_type of a preset's family or of a checkpoint directory's config.json; None
    when neither says (a directory without config.json, or a source that is neither: loading refuses it)."""
    if str(source).startswith(PRESET_PREFIX):
        from vitserve.models.presets import preset_model_type  # (here: vitserve.models imports vitserve.preprocess)

        return preset_model_type(str(source))
    if Path(source).is_dir():
        return checkpoint_model_type(source)
    return None


def preprocess_for(source: str | Path, overrides: dict[str, Any] | None = None) -> PreprocessConfig:
    """The checkpoint's preprocessing over its family's released values (or those alone), with
    `overrides` (field -> value; None values are left out) over it. ValueError naming the file or the
    setting when one is wrong."""
    if str(source).startswith(PRESET_PREFIX):  # (an unknown preset's error names the presets: left as it is)
        base = released_preprocess(source_model_type(source))
    else:
        try:
            released = released_preprocess(source_model_type(source))
            base = PreprocessConfig.from_pretrained(source, base=released) if checkpoint_files(source) else released
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise ValueError(f"the checkpoint's preprocessing: {err}") from None
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    _check_overrides_apply(base, given, source)
    return dataclasses.replace(base, **given) if given else base


# Settings of the smart_resize rule alone: the navit rule (Kimi K2.5) sizes by patch limits instead.
_SMART_RESIZE_ONLY = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels",
                      "video_cap_pixels_per_frame", "video_max_frame_tokens")


def _check_overrides_apply(base: PreprocessConfig, given: dict[str, Any], source: str | Path) -> None:
    """A pixel limit given for a model sized by the navit rule would change nothing: say so instead."""
    if base.resize_rule != "navit" or "resize_rule" in given:
        return
    ignored = [name for name in _SMART_RESIZE_ONLY if name in given and given[name] != getattr(base, name)]
    if ignored:
        family = preprocess_family(source_model_type(source))
        raise ValueError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to {family}'s "
                         "preprocessing, which limits patches, not pixels: leave "
                         f"{'it' if len(ignored) == 1 else 'them'} out, and set image_max_patches, "
                         "video_frame_max_patches or max_patches_per_side in the checkpoint's processor configs")


def overridden(config: PreprocessConfig, source: str | Path) -> list[str]:
    """The settings of `config` that differ from the source's own (its checkpoint's, or the defaults)."""
    own = preprocess_for(source)
    return [field.name for field in dataclasses.fields(config) if getattr(config, field.name) != getattr(own, field.name)]


def describe(config: PreprocessConfig, source: str | Path, overridden: list[str] = ()) -> str:
    """Which preprocessing values are in force and where they come from (`overridden`: the names of
    what was given over the source's own), in one line."""
    files = checkpoint_files(source)
    family = preprocess_family(source_model_type(source))
    origin = " and ".join(path.name for path in files) if files else f"the released {family} defaults"
    if overridden:
        origin += f", overridden by {', '.join(overridden)}"
    if config.resize_rule == "navit":
        return (f"preprocessing from {origin}: never scaled up; images at most {config.image_max_patches} patches, "
                f"video frames at most {config.video_frame_max_patches} each, at most {config.max_patches_per_side} a "
                f"side, padded with zeros to multiples of {config.factor} pixels; at most {config.max_video_frames} "
                f"frames; patch {config.patch_size}, merge {config.merge_size}, temporal patch "
                f"{config.temporal_patch_size}{', raster order' if config.raster_patches else ''}; mean "
                f"{list(config.image_mean)}, std {list(config.image_std)}")
    cap = (f"each frame at most {config.video_max_frame_tokens} merged patches (per-frame cap)"
           if config.video_cap_pixels_per_frame else "no per-frame cap")
    image_rule = (f" (sized as a {config.temporal_patch_size}-frame clip)" if config.image_resize_as_clip else "")
    return (f"preprocessing from {origin}: image pixels {config.image_min_pixels}..{config.image_max_pixels}"
            f"{image_rule}; video pixels {config.video_min_pixels}..{config.video_max_pixels} over a clip's frames, "
            f"{cap}, at most {config.max_video_frames} frames; patch {config.patch_size}, merge {config.merge_size}, "
            f"temporal patch {config.temporal_patch_size}; mean {list(config.image_mean)}, "
            f"std {list(config.image_std)}")
