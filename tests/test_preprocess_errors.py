"""Bad input and bad configuration fail with messages that say what to change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitserve.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess_batch,
    preprocess_image,
    preprocess_video,
)


def pixels(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_error_is_a_value_error():
    assert issubclass(PreprocessError, ValueError)


def test_non_array_input():
    with pytest.raises(PreprocessError, match="numpy array or torch tensor.*got list"):
        preprocess_image([[0, 0, 0]])


def test_wrong_dtype():
    with pytest.raises(PreprocessError, match="dtype float32; expected uint8"):
        preprocess_image(np.zeros((32, 32, 3), dtype=np.float32))


def test_wrong_dtype_torch():
    with pytest.raises(PreprocessError, match="dtype torch.int64; expected uint8"):
        preprocess_image(torch.zeros(32, 32, 3, dtype=torch.int64))


def test_image_wrong_rank():
    message = r"shape \(32, 32\) \(2 dims\); expected an image of shape H×W×3"
    with pytest.raises(PreprocessError, match=message):
        preprocess_image(pixels(32, 32))


def test_video_wrong_rank():
    with pytest.raises(PreprocessError, match=r"expected a video of shape T×H×W×3 \(4 dims\)"):
        preprocess_video(pixels(32, 32, 3))


def test_batch_wrong_rank_names_the_item():
    message = r"item 1 has shape \(1, 2, 32, 32, 3\) \(5 dims\); expected an image"
    with pytest.raises(PreprocessError, match=message):
        preprocess_batch([pixels(32, 32, 3), pixels(1, 2, 32, 32, 3)])


def test_not_three_channels():
    with pytest.raises(PreprocessError, match="4 channels in its last dimension.*expected 3 \\(RGB\\)"):
        preprocess_image(pixels(32, 32, 4))


def test_channels_first_is_rejected():
    with pytest.raises(PreprocessError, match="32 channels in its last dimension"):
        preprocess_image(pixels(3, 32, 32))


@pytest.mark.parametrize("shape", [(0, 32, 3), (32, 0, 3)])
def test_empty_image(shape):
    with pytest.raises(PreprocessError, match="is empty.*every dimension must be at least 1"):
        preprocess_image(pixels(*shape))


def test_empty_video():
    with pytest.raises(PreprocessError, match=r"is empty \(shape \(0, 32, 32, 3\)\)"):
        preprocess_video(pixels(0, 32, 32, 3))


def test_aspect_ratio_over_200():
    with pytest.raises(PreprocessError, match=r"aspect ratio 201.0 \(H×W = 1×201\) is over 200"):
        preprocess_image(pixels(1, 201, 3))


def test_aspect_ratio_over_200_in_video():
    with pytest.raises(PreprocessError, match="aspect ratio .* is over 200"):
        preprocess_video(pixels(2, 2000, 8, 3))


def test_raw_pixels_over_limit():
    config = PreprocessConfig(max_input_pixels=1000)
    with pytest.raises(PreprocessError, match=r"32×32 = 1024 pixels per image, over max_input_pixels=1000"):
        preprocess_image(pixels(32, 32, 3), config)


def test_raw_pixels_over_limit_per_frame():
    config = PreprocessConfig(max_input_pixels=1000)
    with pytest.raises(PreprocessError, match="pixels per frame, over max_input_pixels=1000"):
        preprocess_video(pixels(2, 32, 32, 3), config)


def test_too_many_video_frames():
    config = PreprocessConfig(max_video_frames=4)
    with pytest.raises(PreprocessError, match="has 5 frames, over max_video_frames=4; sample fewer"):
        preprocess_video(pixels(5, 32, 32, 3), config)


def test_default_frame_limit_is_768():
    with pytest.raises(PreprocessError, match="769 frames, over max_video_frames=768"):
        preprocess_video(np.broadcast_to(pixels(1, 32, 32, 3), (769, 32, 32, 3)))


# ---------------------------------------------------------------- PreprocessConfig


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("patch_size", 0, "patch_size must be at least 1, got 0"),
        ("merge_size", 2.0, "merge_size must be an int, got float"),
        ("temporal_patch_size", True, "temporal_patch_size must be an int, got bool"),
        ("max_input_pixels", -5, "max_input_pixels must be at least 1"),
        ("max_video_frames", 0, "max_video_frames must be at least 1"),
        ("image_mean", (0.5, 0.5), r"image_mean must hold 3 numbers \(one per RGB channel\)"),
        ("image_std", (0.5, 0.0, 0.5), "image_std must be positive in every channel"),
        ("image_std", (0.5, float("nan"), 0.5), "image_std must hold 3 finite numbers"),
    ],
)
def test_config_field_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**{field: value})


def test_config_min_over_max():
    with pytest.raises(ValueError, match=r"video_min_pixels \(100\) is larger than video_max_pixels \(10\)"):
        PreprocessConfig(video_min_pixels=100, video_max_pixels=10)


def test_config_is_frozen_and_normalises_lists():
    config = PreprocessConfig(image_mean=[0.4, 0.5, 0.6])
    assert config.image_mean == (0.4, 0.5, 0.6)
    assert config.patch_dim == 1536 and config.factor == 32
    with pytest.raises(AttributeError):
        config.patch_size = 14  # type: ignore[misc]


QWEN3_VL_IMAGE_JSON = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_VIDEO_JSON = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "video_processor_type": "Qwen3VLVideoProcessor",
}


def write_json(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_from_pretrained_reads_the_released_configs(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", QWEN3_VL_IMAGE_JSON)
    write_json(tmp_path / "video_preprocessor_config.json", QWEN3_VL_VIDEO_JSON)
    assert PreprocessConfig.from_pretrained(tmp_path) == PreprocessConfig()


def test_from_pretrained_reads_other_values(tmp_path):
    image_json = dict(QWEN3_VL_IMAGE_JSON, patch_size=14, image_mean=[0.48, 0.46, 0.41], min_pixels=3136)
    image_json["size"] = {"shortest_edge": 1000, "longest_edge": 1003520}  # min_pixels wins, as in HF
    write_json(tmp_path / "preprocessor_config.json", image_json)
    config = PreprocessConfig.from_pretrained(str(tmp_path))
    assert config.patch_size == 14
    assert config.image_mean == (0.48, 0.46, 0.41)
    assert (config.image_min_pixels, config.image_max_pixels) == (3136, 1003520)
    # no video file: video limits keep their defaults
    assert (config.video_min_pixels, config.video_max_pixels) == (4096, 25165824)


def test_from_pretrained_defaults_for_missing_keys(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", {"processor_class": "Qwen3VLProcessor"})
    assert PreprocessConfig.from_pretrained(tmp_path) == PreprocessConfig()


def test_from_pretrained_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        PreprocessConfig.from_pretrained(tmp_path / "nowhere")


def test_from_pretrained_missing_preprocessor_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json not found"):
        PreprocessConfig.from_pretrained(tmp_path)


def test_from_pretrained_malformed_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        PreprocessConfig.from_pretrained(tmp_path)


def test_from_pretrained_json_not_an_object(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", QWEN3_VL_IMAGE_JSON)
    write_json(tmp_path / "video_preprocessor_config.json", [1, 2])
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        PreprocessConfig.from_pretrained(tmp_path)


def test_from_pretrained_conflicting_patch_size(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", QWEN3_VL_IMAGE_JSON)
    write_json(tmp_path / "video_preprocessor_config.json", dict(QWEN3_VL_VIDEO_JSON, patch_size=14))
    with pytest.raises(ValueError, match="patch_size differs between"):
        PreprocessConfig.from_pretrained(tmp_path)


def test_from_pretrained_invalid_value_names_the_field(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", dict(QWEN3_VL_IMAGE_JSON, merge_size="2"))
    with pytest.raises(ValueError, match="merge_size must be an int, got str"):
        PreprocessConfig.from_pretrained(tmp_path)


def test_from_pretrained_unsupported_rescale_factor(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", dict(QWEN3_VL_IMAGE_JSON, rescale_factor=1 / 127.5))
    with pytest.raises(ValueError, match="rescale_factor .* is not supported"):
        PreprocessConfig.from_pretrained(tmp_path)
