"""admit(): raw pixels and processed patches are checked and planned before they are queued."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vitserve.engine.admission import AdmissionError, AdmittedItem, admit
from vitserve.ipc.codec import frame_array
from vitserve.ipc.messages import ArrayRef
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video

CONFIG = PreprocessConfig()
NO_LIMIT = 10**9


def pixels(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def rejected(item, code: str = "invalid_input", *, config: PreprocessConfig = CONFIG, token_limit: int = NO_LIMIT,
             label: str | None = None) -> str:
    """The message of the AdmissionError `admit` raises, after checking its code."""
    kwargs = {} if label is None else {"label": label}
    with pytest.raises(AdmissionError) as info:
        admit(item, config, token_limit, **kwargs)
    err = info.value
    assert err.code == code, (err.code, err.message)
    assert err.message == str(err) and err.message
    return err.message


# -- raw images and videos -----------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(224, 224), (64, 64), (300, 517), (17, 900), (1000, 31), (1, 200),
                                           (480, 640), (2000, 1500)])
def test_image_grid_matches_preprocess(height, width):
    image = pixels(height, width, 3)
    admitted = admit(image, CONFIG, NO_LIMIT)
    assert isinstance(admitted, AdmittedItem)
    assert admitted.kind == "image"
    expected = tuple(preprocess_image(image).grid_thw[0].tolist())
    assert admitted.grid == expected
    t, h, w = expected
    assert t == 1
    assert admitted.tokens == t * h * w
    assert admitted.sequences == 1
    assert admitted.array is image or np.shares_memory(admitted.array, image)
    assert admitted.array.shape == image.shape and admitted.array.dtype == np.uint8


@pytest.mark.parametrize("frames, height, width", [(1, 64, 64), (2, 64, 64), (3, 100, 60), (4, 64, 96),
                                                   (5, 10, 1000), (8, 240, 320), (2, 1, 150)])
def test_video_grid_matches_preprocess(frames, height, width):
    video = pixels(frames, height, width, 3)
    admitted = admit(video, CONFIG, NO_LIMIT)
    assert admitted.kind == "video"
    expected = tuple(preprocess_video(video).grid_thw[0].tolist())
    assert admitted.grid == expected
    t, h, w = expected
    assert t == -(-frames // CONFIG.temporal_patch_size)
    assert admitted.tokens == t * h * w
    assert admitted.sequences == t
    assert np.shares_memory(admitted.array, video)


def test_torch_image_and_video():
    image = torch.from_numpy(pixels(120, 90, 3))
    video = torch.from_numpy(pixels(3, 50, 70, 3))
    for item, kind, reference in ((image, "image", preprocess_image(image)), (video, "video", preprocess_video(video))):
        admitted = admit(item, CONFIG, NO_LIMIT)
        assert admitted.kind == kind
        assert admitted.grid == tuple(reference.grid_thw[0].tolist())
        assert isinstance(admitted.array, np.ndarray)
        assert np.shares_memory(admitted.array, item.numpy())
        t, h, w = admitted.grid
        assert admitted.tokens == t * h * w and admitted.sequences == t


def test_non_contiguous_inputs():
    chw = torch.from_numpy(pixels(3, 40, 60))
    hwc = chw.permute(1, 2, 0)  # channels-last view of channels-first memory
    admitted = admit(hwc, CONFIG, NO_LIMIT)
    assert admitted.grid == tuple(preprocess_image(hwc.contiguous()).grid_thw[0].tolist())
    flipped = pixels(40, 60, 3)[::-1]
    admitted = admit(flipped, CONFIG, NO_LIMIT)
    assert admitted.grid == tuple(preprocess_image(np.ascontiguousarray(flipped)).grid_thw[0].tolist())
    assert np.shares_memory(admitted.array, flipped)


def test_read_only_frame_from_the_wire_is_admitted_without_copy_or_warning():
    image = pixels(33, 47, 3)
    frame = memoryview(image.tobytes())
    array = frame_array(ArrayRef(0, "uint8", image.shape), [frame])
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        admitted = admit(array, CONFIG, NO_LIMIT)
    assert admitted.array is array
    assert admitted.grid == tuple(preprocess_image(image).grid_thw[0].tolist())


def test_token_limit_is_inclusive():
    image = pixels(224, 224, 3)
    tokens = admit(image, CONFIG, NO_LIMIT).tokens
    assert tokens == 256
    assert admit(image, CONFIG, tokens).tokens == tokens
    message = rejected(image, "too_large", token_limit=tokens - 1)
    assert f"{tokens} patch tokens" in message and f"limit of {tokens - 1}" in message


def test_too_large_image():
    message = rejected(pixels(224, 224, 3), "too_large", token_limit=16)
    assert message.startswith("item has 256 patch tokens")
    assert "limit of 16 per item" in message


def test_too_large_video_counts_every_temporal_patch():
    video = pixels(6, 64, 64, 3)
    admitted = admit(video, CONFIG, NO_LIMIT)
    assert admitted.sequences == 3
    message = rejected(video, "too_large", token_limit=admitted.tokens - 1)
    assert f"{admitted.tokens} patch tokens" in message


def test_too_large_patches():
    patches = preprocess_image(pixels(64, 64, 3))
    message = rejected((patches.pixel_values, patches.grid_thw), "too_large", token_limit=16, label="item 2")
    assert message.startswith("item 2 has 256 patch tokens") and "limit of 16" in message


def test_custom_config_changes_the_plan():
    config = PreprocessConfig(image_min_pixels=32 * 32, image_max_pixels=64 * 64)
    image = pixels(500, 500, 3)
    admitted = admit(image, config, NO_LIMIT)
    assert admitted.grid == tuple(preprocess_image(image, config).grid_thw[0].tolist()) == (1, 4, 4)


# -- raw input errors ------------------------------------------------------------------------------


def test_float32_image():
    message = rejected(np.zeros((32, 32, 3), np.float32))
    assert "dtype float32; expected uint8" in message


def test_float_torch_video():
    message = rejected(torch.zeros(2, 32, 32, 3))
    assert "dtype torch.float32; expected uint8" in message


def test_object_array():
    assert "dtype object" in rejected(np.zeros((4, 4, 3), object))


def test_two_dimensional_array():
    message = rejected(pixels(32, 32))
    assert "(2 dims); expected an image H×W×3 (3 dims) or a video T×H×W×3 (4 dims)" in message


def test_five_dimensional_array():
    assert "(5 dims)" in rejected(pixels(1, 2, 8, 8, 3))


@pytest.mark.parametrize("shape", [(32, 32, 4), (32, 32, 1), (2, 32, 32, 4), (3, 32, 32)])
def test_not_three_channels(shape):
    message = rejected(pixels(*shape))
    assert f"has {shape[-1]} channels" in message and "expected 3 (RGB) channels-last" in message


@pytest.mark.parametrize("shape", [(0, 32, 3), (32, 0, 3), (0, 32, 32, 3), (2, 0, 5, 3)])
def test_zero_sized(shape):
    assert "is empty" in rejected(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("shape", [(1, 300, 3), (300, 1, 3), (2, 402, 3), (2, 1, 201, 3)])
def test_aspect_ratio_over_200(shape):
    message = rejected(pixels(*shape))
    assert "aspect ratio" in message and "is over 200" in message


@pytest.mark.parametrize("shape", [(1, 200, 3), (200, 1, 3), (2, 400, 3), (2, 1, 200, 3)])
def test_aspect_ratio_of_200_is_admitted(shape):
    admitted = admit(pixels(*shape), CONFIG, NO_LIMIT)
    preprocess = preprocess_video if len(shape) == 4 else preprocess_image
    assert admitted.grid == tuple(preprocess(pixels(*shape)).grid_thw[0].tolist())


def test_too_many_frames():
    message = rejected(pixels(5, 8, 8, 3), config=PreprocessConfig(max_video_frames=4))
    assert "has 5 frames, over max_video_frames=4" in message
    assert admit(pixels(4, 8, 8, 3), PreprocessConfig(max_video_frames=4), NO_LIMIT).grid[0] == 2


def test_too_many_frames_default_limit():
    limit = CONFIG.max_video_frames
    message = rejected(np.zeros((limit + 1, 2, 2, 3), np.uint8))
    assert f"has {limit + 1} frames, over max_video_frames={limit}" in message


def test_too_many_input_pixels():
    message = rejected(pixels(40, 40, 3), config=PreprocessConfig(max_input_pixels=1000))
    assert "1600 pixels per image" in message and "max_input_pixels=1000" in message


@pytest.mark.parametrize("item, name", [([[[0, 0, 0]]], "list"), ("image.png", "str"), (None, "NoneType"),
                                        (b"\x00" * 12, "bytes"), ((pixels(4, 4, 3),), "tuple"),
                                        ((1, 2, 3), "tuple")])
def test_not_an_array(item, name):
    message = rejected(item)
    assert "must be a numpy array or torch tensor" in message and f"got {name}" in message


def test_list_pair_is_not_a_patch_pair():
    patches = preprocess_image(pixels(64, 64, 3))
    assert "got list" in rejected([patches.pixel_values, patches.grid_thw])


# -- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", [
    np.zeros((32, 32, 3), np.float32), pixels(32, 32), pixels(32, 32, 4), np.zeros((0, 4, 3), np.uint8),
    pixels(1, 300, 3), "not an image",
])
def test_label_in_raw_input_messages(item):
    assert rejected(item, label="item 3").startswith("item 3")
    assert rejected(item).startswith("item")


def test_label_in_frame_limit_message():
    message = rejected(pixels(3, 4, 4, 3), config=PreprocessConfig(max_video_frames=2), label="clip B")
    assert message.startswith("clip B has 3 frames")


def test_label_in_too_large_message():
    assert rejected(pixels(224, 224, 3), "too_large", token_limit=16, label="item 12").startswith("item 12 has 256")


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
