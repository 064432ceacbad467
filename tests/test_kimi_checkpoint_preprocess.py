"""Kimi K2.5's preprocessing settings: validated, read from a checkpoint's processor files in Hugging Face's
layout or in the released checkpoint's own (remote code, media_proc_cfg), refused with the setting named when
vitserve cannot follow them, and the pixel-limit flags refused for a model that limits patches."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("transformers")
from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor  # noqa: E402
from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor  # noqa: E402

import vitserve.models.presets as presets  # noqa: E402
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video  # noqa: E402
from vitserve.preprocess.config import released_preprocess  # noqa: E402
from vitserve.preprocess.in_force import describe, preprocess_for  # noqa: E402

KIMI = released_preprocess("kimi_k25")
# One uint8 step of resize rounding after normalising by std 0.5, plus float32 slack.
ROUNDING = 1 / 255 / 0.5 + 1e-5


@pytest.mark.parametrize("changes,match", [
    (dict(resize_rule="kimi"), "resize_rule must be 'smart_resize' .* or 'navit' .*, got 'kimi'"),
    (dict(raster_patches=True), "raster_patches puts one frame in each row, so temporal_patch_size must be 1, got 2"),
    (dict(raster_patches="yes"), "raster_patches must be true or false"),
    (dict(image_max_patches=0), "image_max_patches must be at least 1, got 0"),
    (dict(max_patches_per_side=2.5), "max_patches_per_side must be an int"),
])
def test_settings_are_validated(changes, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**changes)


@pytest.mark.parametrize("name", ["image_resize_as_clip", "video_cap_pixels_per_frame"])
def test_smart_resize_settings_are_refused_with_the_navit_rule(name):
    with pytest.raises(ValueError, match=f"{name} belongs to the smart_resize rule; with resize_rule 'navit'"):
        replace(KIMI, **{name: True})


def random_pixels(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """HF's Kimi processors return (N, C, P, P): our rows are those, flattened."""
    reference = reference.reshape(reference.shape[0], -1)
    assert ours.shape == reference.shape and (ours - reference).abs().max().item() <= ROUNDING


def write_json(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def kimi_checkpoint(directory, model_type: str = "kimi_k25") -> None:
    vision = {"model_type": "kimi_k25_vision", "patch_size": 14, "merge_kernel_size": [2, 2]}
    write_json(directory / "config.json", {"model_type": model_type, "vision_config": vision})


@pytest.mark.parametrize("model_type", ["kimi_k25", "kimi_k25_vision"])
def test_a_kimi_checkpoint_without_processor_files_gets_the_released_values(tmp_path, model_type):
    kimi_checkpoint(tmp_path, model_type)
    assert preprocess_for(tmp_path) == KIMI
    assert describe(KIMI, tmp_path) == (
        "preprocessing from the released Kimi K2.5 defaults: never scaled up; images at most 16384 patches, video "
        "frames at most 4096 each, at most 512 a side, padded with zeros to multiples of 28 pixels; at most 768 "
        "frames; patch 14, merge 2, temporal patch 1, raster order; mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]")


def test_hf_processors_saved_in_the_checkpoint_give_their_values_and_equal_ours(tmp_path):
    kimi_checkpoint(tmp_path)
    side = {"max_height": 40, "max_width": 40}
    Kimi_K25ImageProcessor(max_patches=900, size=side, image_mean=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    Kimi_K25VideoProcessor(max_patches=200, size=side, image_mean=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    config = preprocess_for(tmp_path)
    assert config == replace(KIMI, image_max_patches=900, video_frame_max_patches=200, max_patches_per_side=40,
                             image_mean=(0.4, 0.5, 0.6))  # (temporal_patch_size 4 in the video file: not read)
    hf_image = Kimi_K25ImageProcessor.from_pretrained(tmp_path)
    hf_video = Kimi_K25VideoProcessor.from_pretrained(tmp_path, do_sample_frames=False)
    for shape in [(300, 500, 3), (20, 30, 3), (900, 200, 3), (6, 200, 300, 3), (5, 64, 96, 3)]:
        item = random_pixels(*shape, seed=sum(shape))
        if item.ndim == 3:
            reference = hf_image(images=item, return_tensors="pt", input_data_format="channels_last")
            pixels, grid, ours = reference["pixel_values"], reference["image_grid_thw"], preprocess_image(item, config)
        else:
            reference = hf_video(videos=[item], return_tensors="pt", input_data_format="channels_last")
            pixels, grid = reference["pixel_values_videos"], reference["video_grid_thw"]
            grid = torch.tensor([[int(grid[:, 0].sum()), *grid[0, 1:].tolist()]])
            ours = preprocess_video(item, config)
        assert torch.equal(ours.grid_thw, grid)
        assert_close(ours.pixel_values, pixels)


# The released checkpoint's own (remote-code) preprocessor_config.json
RELEASED_MEDIA_PROC_CFG = {
    "in_patch_limit": 16384, "patch_size": 14, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "merge_kernel_size": 2, "fixed_output_tokens": None, "patch_limit_on_one_side": 512,
    "in_patch_limit_each_frame": 4096, "in_patch_limit_video": None, "sample_fps": 2.0,
    "max_num_frames_each_video": None, "temporal_merge_kernel_size": 4, "timestamp_mode": "hh:mm:ss.fff",
}


@pytest.mark.parametrize("nested", [True, False], ids=["media_proc_cfg", "top level"])
def test_the_remote_code_layout_is_read(tmp_path, nested):
    kimi_checkpoint(tmp_path)

    def write(media: dict) -> PreprocessConfig:
        write_json(tmp_path / "preprocessor_config.json", {"media_proc_cfg": media} if nested else media)
        return PreprocessConfig.from_pretrained(tmp_path)

    assert write(RELEASED_MEDIA_PROC_CFG) == KIMI
    limits = dict(in_patch_limit=1024, in_patch_limit_each_frame=64, patch_limit_on_one_side=16,
                  merge_kernel_size=[2, 2], max_num_frames_each_video=100)
    assert write({**RELEASED_MEDIA_PROC_CFG, **limits}) == replace(
        KIMI, image_max_patches=1024, video_frame_max_patches=64, max_patches_per_side=16, max_video_frames=100)
    # the remote code's fallback: no per-frame limit means in_patch_limit
    assert write({"in_patch_limit": 2000, "in_patch_limit_each_frame": None}) == replace(
        KIMI, image_max_patches=2000, video_frame_max_patches=2000)


@pytest.mark.parametrize("image_json,video_json,match", [
    ({"media_proc_cfg": {**RELEASED_MEDIA_PROC_CFG, "in_patch_limit_video": 100000}}, None,
     "preprocessor_config.json: in_patch_limit_video 100000 .* is not supported; .* set it to null"),
    ({"size": {"max_height": 512, "max_width": 256}}, None,
     r"preprocessor_config.json: size \[512, 256\] must be square .* make them equal"),
    ({"size": {"max_height": 64, "max_width": 64}}, {"size": {"max_height": 32, "max_width": 32}},
     "size differs between preprocessor_config.json .64. and video_preprocessor_config.json .32.; vitserve uses "
     "one value for both"),
    ({"max_patches": 0}, None, r"PreprocessConfig.image_max_patches must be at least 1, got 0 \(as read from "
                               r"preprocessor_config.json: fix the value there\)"),
])
def test_kimi_files_that_vitserve_cannot_follow_are_named(tmp_path, image_json, video_json, match):
    kimi_checkpoint(tmp_path)
    write_json(tmp_path / "preprocessor_config.json", image_json)
    if video_json is not None:
        write_json(tmp_path / "video_preprocessor_config.json", video_json)
    with pytest.raises(ValueError, match="the checkpoint's preprocessing: " + match):
        preprocess_for(tmp_path)


def test_pixel_limits_given_for_kimi_are_refused_and_the_others_apply(tmp_path):
    kimi_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="image_max_pixels does not apply to Kimi K2.5's preprocessing, which limits "
                                         "patches, not pixels: leave it out"):
        preprocess_for(tmp_path, {"image_max_pixels": 28 * 28 * 100})
    assert preprocess_for(tmp_path, {"max_video_frames": 64, "video_cap_pixels_per_frame": False}) == replace(
        KIMI, max_video_frames=64)


def test_a_qwen_checkpoint_ignores_kimi_keys(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "qwen3_vl"})
    write_json(tmp_path / "preprocessor_config.json", {"max_patches": 10, "media_proc_cfg": {"in_patch_limit": 10}})
    assert PreprocessConfig.from_pretrained(tmp_path) == PreprocessConfig()


def test_the_kimi_presets_get_the_kimi_values():
    assert presets.preset_model_type("random:kimi-k2.5") == "kimi_k25"
    assert preprocess_for("random:kimi-k2.5") == KIMI
    assert "the released Kimi K2.5 defaults" in describe(KIMI, "random:kimi-k2.5")
