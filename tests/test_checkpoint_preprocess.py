"""A checkpoint's own preprocessing: `load_model`, `EngineConfig` and `vitserve serve` read the
processor configs Hugging Face saved beside the weights (pixel limits, mean/std, the per-frame cap),
flags override them, the start-up line says which values are in force, and the served grids and
rows are those of Hugging Face's processors with the same settings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import transformers
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from hf_checkpoints import full_checkpoint  # noqa: F401 (a fixture, used by name)
from served import served

from vitserve import Client
from vitserve.engine import EngineConfig
from vitserve.models import load_model
from vitserve.preprocess import PreprocessConfig, preprocess_image, preprocess_video
from vitserve.workers.worker import check_fits

COMMON = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.48, 0.46, 0.41],
              image_std=[0.27, 0.26, 0.28])
IMAGE_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 60}  # far below the released limits
VIDEO_SIZE = {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 2 * 40}
FRAME_TOKENS = 12  # with the per-frame cap: merged patches per frame
IMAGE_MAX_FLAG = 32 * 32 * 30  # `--image-max-pixels`, over the checkpoint's
ROUNDING = 2 / 255 / min(COMMON["image_std"]) + 1e-5  # one uint8 step of resize rounding, after normalising


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, full_checkpoint):
    directory = tmp_path_factory.mktemp("checkpoint") / "model"
    shutil.copytree(full_checkpoint[0], directory)
    transformers.Qwen2VLImageProcessor(size=IMAGE_SIZE, **COMMON).save_pretrained(directory)
    Qwen3VLVideoProcessor(size=VIDEO_SIZE, cap_pixels_per_frame=True, max_video_tokens=FRAME_TOKENS,
                          **COMMON).save_pretrained(directory)
    return directory


def expected_config(**overrides) -> PreprocessConfig:
    values = dict(image_min_pixels=IMAGE_SIZE["shortest_edge"], image_max_pixels=IMAGE_SIZE["longest_edge"],
                  video_min_pixels=VIDEO_SIZE["shortest_edge"], video_max_pixels=VIDEO_SIZE["longest_edge"],
                  video_cap_pixels_per_frame=True, video_max_frame_tokens=FRAME_TOKENS, **COMMON)
    return PreprocessConfig(**{**values, **overrides})


def hf_processors(directory, image_max_pixels: int):
    """Hugging Face's processors as a user loads them from the checkpoint, with the flag's override."""
    image = transformers.AutoImageProcessor.from_pretrained(directory)
    image.size = {"shortest_edge": IMAGE_SIZE["shortest_edge"], "longest_edge": image_max_pixels}
    video = Qwen3VLVideoProcessor.from_pretrained(directory, do_sample_frames=False)
    return image, video


def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (300, 500, 3), dtype=np.uint8),  # over both image limits: shrunk
            rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),  # under the minimum: grown
            rng.integers(0, 256, (6, 200, 300, 3), dtype=np.uint8),  # the per-frame cap decides its size
            rng.integers(0, 256, (30, 64, 96, 3), dtype=np.uint8)]  # the clip's pixel limit decides


def test_load_model_and_engine_config_read_the_checkpoints_processor_configs(checkpoint):
    assert load_model(checkpoint).preprocess == expected_config()
    assert EngineConfig(model=str(checkpoint)).preprocess == expected_config()
    assert load_model("random:tiny").preprocess == PreprocessConfig() == EngineConfig().preprocess


def test_our_preprocessing_with_these_settings_is_hugging_faces(checkpoint):
    config = expected_config(image_max_pixels=IMAGE_MAX_FLAG)
    hf_image, hf_video = hf_processors(checkpoint, IMAGE_MAX_FLAG)
    for item in inputs():
        if item.ndim == 3:
            ours = preprocess_image(item, config)
            reference = hf_image(images=item, return_tensors="pt", input_data_format="channels_last")
            pixels, grid = reference["pixel_values"], reference["image_grid_thw"]
        else:
            ours = preprocess_video(item, config)
            reference = hf_video(videos=[item], return_tensors="pt", input_data_format="channels_last")
            pixels, grid = reference["pixel_values_videos"], reference["video_grid_thw"]
        assert torch.equal(ours.grid_thw, grid), item.shape
        assert (ours.pixel_values - pixels.float()).abs().max().item() <= ROUNDING, item.shape


def test_serve_follows_the_checkpoint_and_the_flags_and_says_so(checkpoint, tmp_path):
    config = expected_config(image_max_pixels=IMAGE_MAX_FLAG)
    model = load_model(checkpoint)
    hf_image, hf_video = hf_processors(checkpoint, IMAGE_MAX_FLAG)
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", str(checkpoint), "--image-max-pixels", str(IMAGE_MAX_FLAG),
                "--min-budget", "64", "--max-budget", "512") as process:
        with Client(endpoint) as client:
            assert PreprocessConfig(**client.model.preprocess) == config
            with client.encode(inputs()) as result:
                for item, served_item in zip(inputs(), result.items):
                    processor = hf_image if item.ndim == 3 else hf_video
                    key = "image_grid_thw" if item.ndim == 3 else "video_grid_thw"
                    arguments = {"images": item} if item.ndim == 3 else {"videos": [item]}
                    grid = processor(**arguments, return_tensors="pt", input_data_format="channels_last")[key]
                    assert served_item.grid == tuple(grid[0].tolist()), item.shape
                    ours = (preprocess_image if item.ndim == 3 else preprocess_video)(item, config)
                    expected = model.encode_patches(ours.pixel_values, ours.grid_thw)
                    torch.testing.assert_close(served_item.embeddings, expected.embeddings, atol=1e-5, rtol=1e-5)
    said = process.stderr.read()
    assert ("preprocessing from preprocessor_config.json and video_preprocessor_config.json, overridden by "
            f"--image-max-pixels: image pixels {IMAGE_SIZE['shortest_edge']}..{IMAGE_MAX_FLAG}") in said, said
    assert f"each frame at most {FRAME_TOKENS} merged patches (per-frame cap)" in said, said


def test_a_broken_or_mismatched_processor_config_is_refused_before_serving(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        EngineConfig(model=str(broken))
    with pytest.raises(ValueError, match=r"patch_size 14 \(the model's: 16\)"):
        check_fits(PreprocessConfig(patch_size=14), load_model("random:tiny"))
