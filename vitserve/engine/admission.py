"""Admission: each input item checked and planned before it is queued.

Raw images and videos are checked for dtype, shape, size and aspect ratio, and their patch
grid is planned on the host with the processor's own arithmetic (the pixels are processed
later, on the worker's device); processed patches are checked against their grid. What
fails here is answered at once with `invalid_input` or `too_large` and never reaches a
worker, so one bad item cannot fail a window of other clients' items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vitserve.preprocess import PreprocessConfig, PreprocessError, plan_image, plan_video
from vitserve.preprocess.validate import check_frames

ItemKind = Literal["image", "video", "patches"]


class AdmissionError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AdmittedItem:
    kind: ItemKind
    array: np.ndarray  # uint8 (H, W, 3) / (T, H, W, 3), or float32 patches (tokens, patch_dim)
    grid: tuple[int, int, int]  # (t, h, w) in patches
    slab: str = ""  # the input slab `array` lies in (engine/inputs.py); empty until it is placed in one
    offset: int = -1  # its first byte there

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def sequences(self) -> int:
        """Grid time steps: the segments of a tower that attends per temporal patch (intake divides
        by WorkerReady.temporal_pool for one that pools frames, as Kimi K2.5 does)."""
        return self.grid[0]


def admit(item: Any, config: PreprocessConfig, token_limit: int, label: str = "item",
          slab: tuple[str, int] = ("", -1)) -> AdmittedItem:
    """One input: a uint8 image H×W×3 or video T×H×W×3, or a (pixel_values, grid_thw) pair;
    `slab`: the input slab and offset its array already lies at, if it does."""
    if isinstance(item, tuple) and len(item) == 2:
        admitted = _admit_patches(*item, config=config, label=label, slab=slab)
    else:
        try:
            (frames, height, width), kind = check_frames(item, config, label=label)
            plan = plan_video(frames, height, width, config) if kind == "video" else plan_image(height, width, config)
        except PreprocessError as err:
            raise AdmissionError("invalid_input", str(err)) from None
        array = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        admitted = AdmittedItem(kind, array, (plan.grid_t, plan.grid_h, plan.grid_w), *slab)
    if admitted.tokens > token_limit:
        raise AdmissionError("too_large", f"{label} has {admitted.tokens} patch tokens, over the engine's limit of "
                                          f"{token_limit} per item (max_item_tokens, `vitserve serve "
                                          f"--max-item-tokens`): send a smaller item, or raise the limit")
    return admitted


def _admit_patches(pixel_values: Any, grid_thw: Any, *, config: PreprocessConfig, label: str,
                   slab: tuple[str, int]) -> AdmittedItem:
    def invalid(problem: str) -> AdmissionError:
        return AdmissionError("invalid_input", f"{label} (patches): {problem}")

    patch_dim = 3 * config.temporal_patch_size * config.patch_size**2
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype != torch.float32:
        raise invalid(f"pixel_values must be a 2-D float32 array, got {str(pixel_values.dtype).removeprefix('torch.')} "
                      f"with shape {list(pixel_values.shape)}")
    try:
        values = (pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor)
                  else np.asarray(pixel_values))
        grid = np.asarray(grid_thw.cpu() if isinstance(grid_thw, torch.Tensor) else grid_thw).reshape(-1)
    except (TypeError, ValueError) as err:  # ragged nesting and the like
        raise invalid(f"pixel_values and grid_thw must be arrays: {err}") from None
    if grid.shape != (3,) or not np.issubdtype(grid.dtype, np.integer):
        raise invalid(f"grid_thw must be three integers (t, h, w) for one item, got {grid.tolist()}")
    t, h, w = (int(x) for x in grid)
    merge = config.merge_size
    if t < 1 or h < merge or w < merge or h % merge or w % merge:
        raise invalid(f"grid_thw ({t}, {h}, {w}) needs t >= 1 and h, w positive multiples of the merge size {merge}")
    if values.dtype != np.float32 or values.ndim != 2:
        raise invalid(f"pixel_values must be a 2-D float32 array, got {values.dtype} with shape {list(values.shape)}")
    if values.shape != (t * h * w, patch_dim):
        raise invalid(f"pixel_values has shape {list(values.shape)}, but grid_thw ({t}, {h}, {w}) needs "
                      f"[{t * h * w}, {patch_dim}]")
    if not np.isfinite(values).all():
        raise invalid("pixel_values contains NaN or Inf")
    return AdmittedItem("patches", values, (t, h, w), *slab)
