"""admit(): raw pixels and processed patches are checked and planned before they are queued."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from admission_helpers import CONFIG, NO_LIMIT, pixels, rejected

from vitserve.engine.admission import AdmittedItem, admit
from vitserve.ipc.codec import frame_array
from vitserve.ipc.messages import ArrayRef
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video


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
