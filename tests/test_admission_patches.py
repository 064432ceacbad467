"""admit() on processed (pixel_values, grid_thw) pairs: accepted forms and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from admission_helpers import CONFIG, NO_LIMIT, pixels, rejected

from vitserve.engine.admission import admit
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video


# -- processed patches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_patches():
    return preprocess_image(pixels(64, 96, 3))


@pytest.fixture(scope="module")
def video_patches():
    return preprocess_video(pixels(3, 64, 64, 3))


def _grid_forms(grid: torch.Tensor) -> list:
    row = grid[0].tolist()
    return [row, tuple(row), np.array(row), np.array(row, np.int32), np.array([row]), grid, grid[0],
            grid.to(torch.int32), [np.int64(x) for x in row]]


@pytest.mark.parametrize("form", range(9))
def test_patches_admitted_with_any_grid_form(image_patches, form):
    values, grid = image_patches
    given = _grid_forms(grid)[form]
    admitted = admit((values, given), CONFIG, NO_LIMIT)
    assert admitted.kind == "patches"
    assert admitted.grid == tuple(grid[0].tolist())
    assert all(type(x) is int for x in admitted.grid)
    assert isinstance(admitted.array, np.ndarray) and admitted.array.dtype == np.float32
    assert admitted.array.shape == tuple(values.shape)
    assert admitted.tokens == values.shape[0]
    assert admitted.sequences == 1
    assert np.shares_memory(admitted.array, values.numpy())


def test_patches_as_numpy(image_patches):
    values = image_patches.pixel_values.numpy()
    admitted = admit((values, image_patches.grid_thw), CONFIG, NO_LIMIT)
    assert admitted.array is values or np.shares_memory(admitted.array, values)


def test_video_patches(video_patches):
    values, grid = video_patches
    admitted = admit((values, grid), CONFIG, NO_LIMIT)
    assert admitted.kind == "patches"
    assert admitted.grid == tuple(grid[0].tolist())
    assert admitted.sequences == 2 and admitted.tokens == values.shape[0]


def test_patches_that_require_grad(image_patches):
    values = image_patches.pixel_values.clone().requires_grad_(True)
    admitted = admit((values, image_patches.grid_thw), CONFIG, NO_LIMIT)
    assert admitted.kind == "patches" and admitted.array.shape == tuple(values.shape)


def test_patches_float64(image_patches):
    values, grid = image_patches
    rows = values.shape[0]
    message = rejected((values.double(), grid))
    assert f"pixel_values must be a 2-D float32 array, got float64 with shape [{rows}, 1536]" in message
    message = rejected((values.numpy().astype(np.float64), grid))
    assert "float64" in message


def test_patches_float16(image_patches):
    assert "got float16" in rejected((image_patches.pixel_values.half(), image_patches.grid_thw))


@pytest.mark.parametrize("shape", [(-1,), (1, -1, 1536), (-1, 1536, 1), (2, -1, 1536)])
def test_patches_wrong_rank(image_patches, shape):
    values, grid = image_patches
    message = rejected((values.reshape(shape), grid))
    expected = list(values.reshape(shape).shape)
    assert f"2-D float32 array, got float32 with shape {expected}" in message


def test_patches_wrong_row_count(image_patches):
    values, grid = image_patches
    t, h, w = grid[0].tolist()
    message = rejected((values[:-4], grid))
    assert f"pixel_values has shape [{t * h * w - 4}, 1536], but grid_thw ({t}, {h}, {w}) needs [{t * h * w}, 1536]" \
        in message
    assert "needs [" in rejected((torch.cat([values, values[:4]]), grid))


def test_patches_wrong_patch_dim(image_patches):
    values, grid = image_patches
    rows = values.shape[0]
    message = rejected((values[:, :768].contiguous(), grid))
    assert f"has shape [{rows}, 768]" in message and f"needs [{rows}, 1536]" in message


def test_patch_dim_follows_the_config(image_patches):
    config = PreprocessConfig(patch_size=14)
    values, grid = image_patches
    rows = values.shape[0]
    assert f"needs [{rows}, 1176]" in rejected((values, grid), config=config)
    admitted = admit((torch.zeros(rows, 1176), grid), config, NO_LIMIT)
    assert admitted.grid == tuple(grid[0].tolist())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_patches_not_finite(image_patches, bad):
    values = image_patches.pixel_values.clone()
    values[7, 100] = bad
    assert "pixel_values contains NaN or Inf" in rejected((values, image_patches.grid_thw))


@pytest.mark.parametrize("grid", [[4, 6], (1, 4, 6, 1), [], [[1, 4, 6], [1, 4, 6]], np.zeros((2, 3), np.int64),
                                  torch.tensor([[1, 4, 6], [1, 2, 2]]), 24, None, "146"])
def test_grid_not_three_integers(image_patches, grid):
    message = rejected((image_patches.pixel_values, grid))
    assert "grid_thw must be three integers (t, h, w) for one item" in message


@pytest.mark.parametrize("grid", [[1.0, 4.0, 6.0], np.array([1.0, 4.0, 6.0]), torch.tensor([[1.0, 4.0, 6.0]]),
                                  [1, 4.5, 6], [True, True, False]])
def test_grid_not_integer(image_patches, grid):
    message = rejected((image_patches.pixel_values, grid))
    assert "grid_thw must be three integers" in message


@pytest.mark.parametrize("grid", [(1, 3, 8), (1, 4, 5), (2, 3, 4), (1, 1, 24), (1, 24, 1)])
def test_grid_not_a_multiple_of_the_merge_size(grid):
    t, h, w = grid
    values = np.zeros((t * h * w, 1536), np.float32)
    message = rejected((values, grid))
    assert f"grid_thw ({t}, {h}, {w}) needs t >= 1 and h, w positive multiples of the merge size 2" in message


@pytest.mark.parametrize("grid", [(0, 4, 6), (-1, 4, 6), (1, 0, 4), (1, -2, 4), (1, 4, -2)])
def test_grid_not_positive(grid):
    values = np.zeros((0, 1536), np.float32)
    message = rejected((values, grid))
    assert "needs t >= 1 and h, w positive multiples" in message


def test_grid_merge_size_follows_the_config():
    values = np.zeros((9, 1536), np.float32)
    assert admit((values, (1, 3, 3)), PreprocessConfig(merge_size=3), NO_LIMIT).grid == (1, 3, 3)
    assert "merge size 2" in rejected((values, (1, 3, 3)))


def test_label_in_patch_messages(image_patches):
    values, grid = image_patches
    for pair in ((values.double(), grid), (values, [1, 2]), (values, (1, 3, 8)), (values[:1], grid)):
        assert rejected(pair, label="item 5").startswith("item 5 (patches): ")
        assert rejected(pair).startswith("item (patches): ")


def test_patches_bfloat16_tensor_is_invalid_input(image_patches):
    message = rejected((image_patches.pixel_values.bfloat16(), image_patches.grid_thw))
    assert "float32" in message


@pytest.mark.parametrize("grid", [[1, [4], 6], [[1, 4], [6]]])
def test_ragged_grid_is_invalid_input(image_patches, grid):
    assert "grid_thw" in rejected((image_patches.pixel_values, grid))


def test_ragged_pixel_values_is_invalid_input():
    assert "pixel_values" in rejected(([[0.0] * 1536, [0.0]], (1, 2, 2)))
