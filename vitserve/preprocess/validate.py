"""Input checks: turn a user's uint8 image or video into a (frames, H, W, 3) tensor, or explain why not."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from vitserve.preprocess.config import PreprocessConfig
from vitserve.preprocess.errors import PreprocessError
from vitserve.preprocess.geometry import check_aspect_ratio

Kind = Literal["image", "video"]
_EXPECTED_SHAPE = {"image": "H×W×3", "video": "T×H×W×3"}
_ARTICLE = {"image": "an", "video": "a"}
_RANK_TO_KIND: dict[int, Kind] = {3: "image", 4: "video"}


def as_frames(
    item: object, config: PreprocessConfig, *, kind: Kind | None = None, label: str = "input"
) -> tuple[torch.Tensor, Kind]:
    """Validate `item` and return it as a uint8 tensor (frames, H, W, 3) and its kind.

    `kind=None` takes the kind from the rank (3: image, 4: video). The tensor shares memory
    with the input where it can (numpy arrays are wrapped, not copied).
    """
    (frames, height, width), kind = check_frames(item, config, kind=kind, label=label)
    return _to_tensor(item).reshape(frames, height, width, 3), kind


def check_frames(
    item: object, config: PreprocessConfig, *, kind: Kind | None = None, label: str = "input"
) -> tuple[tuple[int, int, int], Kind]:
    """Validate `item` as `as_frames` does: its (frames, H, W) and kind, or PreprocessError. No
    tensor is made (the engine's admission only plans the item)."""
    if not isinstance(item, (np.ndarray, torch.Tensor)):
        raise PreprocessError(
            f"{label} must be a numpy array or torch tensor of uint8 RGB pixels, got {type(item).__name__}"
        )
    if item.dtype not in (np.uint8, torch.uint8):
        raise PreprocessError(
            f"{label} has dtype {item.dtype}; expected uint8 RGB pixels in 0..255 "
            "(convert float images with (x * 255).round().astype(uint8) or decode to uint8)"
        )
    shape = tuple(int(size) for size in item.shape)
    if kind is None:
        if len(shape) not in _RANK_TO_KIND:
            raise PreprocessError(
                f"{label} has shape {shape} ({len(shape)} dims); expected an image H×W×3 (3 dims) "
                "or a video T×H×W×3 (4 dims)"
            )
        kind = _RANK_TO_KIND[len(shape)]
    expected_rank = 3 if kind == "image" else 4
    if len(shape) != expected_rank:
        raise PreprocessError(
            f"{label} has shape {shape} ({len(shape)} dims); expected {_ARTICLE[kind]} {kind} of shape "
            f"{_EXPECTED_SHAPE[kind]} ({expected_rank} dims)"
        )
    if shape[-1] != 3:
        raise PreprocessError(
            f"{label} has {shape[-1]} channels in its last dimension (shape {shape}); expected 3 (RGB) "
            f"channels-last, {_EXPECTED_SHAPE[kind]}: convert grayscale/RGBA to RGB and move channels last"
        )
    if 0 in shape:
        raise PreprocessError(f"{label} is empty (shape {shape}); every dimension must be at least 1")
    frames = shape[0] if kind == "video" else 1
    height, width = shape[-3], shape[-2]
    if frames > config.max_video_frames:
        raise PreprocessError(
            f"{label} has {frames} frames, over max_video_frames={config.max_video_frames}; "
            "sample fewer frames before sending"
        )
    if height * width > config.max_input_pixels:
        unit = "frame" if kind == "video" else "image"
        raise PreprocessError(
            f"{label} has {height}×{width} = {height * width} pixels per {unit}, "
            f"over max_input_pixels={config.max_input_pixels}; downscale it before sending"
        )
    if config.resize_rule != "navit":  # (smart_resize's limit: the navit rule has none)
        try:
            check_aspect_ratio(height, width)
        except PreprocessError as error:
            raise PreprocessError(f"{label}: {error}") from None
    return (frames, height, width), kind


def _to_tensor(item: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if any(stride < 0 for stride in item.strides):
        item = np.ascontiguousarray(item)  # torch cannot wrap negative strides (e.g. a flipped view)
    if item.flags.writeable:
        return torch.from_numpy(item)
    # Read-only buffers (zmq frames, np.frombuffer) are only ever read here, so wrapping them
    # is safe; silence torch's warning about writes instead of paying for a copy.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(item)
