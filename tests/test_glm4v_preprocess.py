"""GLM-4.1V / 4.5V / 4.6V preprocessing: `released_preprocess("glm4v")` equals Hugging Face's Glm4v image and
video processors (images sized by the clip rule as two frames, patch 14, OpenAI CLIP mean/std), a checkpoint
directory of the family starts from these values with its JSON over them, and the engine's item bound holds."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor  # noqa: E402
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor  # noqa: E402
from transformers.models.glm46v.image_processing_glm46v import Glm46VImageProcessor  # noqa: E402
from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor  # noqa: E402
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

import vitserve.models.presets as presets  # noqa: E402
from vitserve.preprocess import PreprocessConfig, PreprocessError, preprocess_image, preprocess_video  # noqa: E402
from vitserve.preprocess.config import released_preprocess  # noqa: E402
from vitserve.preprocess.geometry import MAX_ASPECT_RATIO, largest_item_tokens, plan_image, plan_video  # noqa: E402
from vitserve.preprocess.in_force import describe, preprocess_for  # noqa: E402

GLM = released_preprocess("glm4v")
# One uint8 step of resize rounding after normalising by the smallest std, plus float32 slack.
ROUNDING = 1 / 255 / min(OPENAI_CLIP_STD) + 1e-5


def test_released_values_are_the_hugging_face_processors():
    image, video = Glm4vImageProcessor(), Glm4vVideoProcessor()
    assert (GLM.patch_size, GLM.temporal_patch_size, GLM.merge_size) == (image.patch_size, image.temporal_patch_size,
                                                                         image.merge_size) == (14, 2, 2)
    assert (GLM.image_min_pixels, GLM.image_max_pixels) == (image.size.shortest_edge, image.size.longest_edge)
    assert (GLM.video_min_pixels, GLM.video_max_pixels) == (video.size.shortest_edge, video.size.longest_edge)
    assert GLM.image_mean == tuple(OPENAI_CLIP_MEAN) and GLM.image_std == tuple(OPENAI_CLIP_STD)
    assert GLM.image_resize_as_clip and not GLM.video_cap_pixels_per_frame
    for model_type in ("glm4v_moe", "glm4v_vision", "glm4v_moe_vision"):
        assert released_preprocess(model_type) == GLM
    assert released_preprocess("glm46v") == replace(GLM, max_video_frames=640)  # its sampler's most
    for model_type in ("qwen3_vl", "qwen3_5", None):
        assert released_preprocess(model_type) == PreprocessConfig()


def test_image_resize_as_clip_must_be_a_bool():
    with pytest.raises(ValueError, match="image_resize_as_clip must be true or false, got 'yes'"):
        PreprocessConfig(image_resize_as_clip="yes")


def random_pixels(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def gradient_image(height: int, width: int) -> np.ndarray:
    rows = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    cols = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    return np.stack([rows, cols, (rows + cols) / 2], axis=-1).round().astype(np.uint8)  # (H, W, 3)


def assert_matches(ours, reference_pixels, reference_grid, size: tuple[int, int]) -> None:
    assert torch.equal(ours.grid_thw, reference_grid)
    assert ours.pixel_values.shape == reference_pixels.shape
    difference = (ours.pixel_values - reference_pixels.float()).abs().max().item()
    resized = tuple(side * GLM.patch_size for side in ours.grid_thw[0, 1:].tolist())
    assert difference == 0.0 if resized == size else difference <= ROUNDING


IMAGE_CASES = [
    # tiny sides (scaled up to one factor first, then grown to min_pixels over two frames)
    (1, 1), (1, 150), (5, 700), (13, 40), (27, 27), (28, 28), (20, 3000), (3000, 20),
    # grown to min_pixels (which counts two frames: more than the image rule gives)
    (60, 80), (100, 100), (56, 84),
    # within the limits, with and without resizing; extreme aspect ratios (up to 150)
    (112, 224), (333, 517), (1008, 1008), (30, 4500), (4000, 30), (100, 15000),
    # shrunk: the limit counts two frames, so these get half the pixels of the image rule
    (2500, 2500), (3000, 4000), (4200, 4100), (7000, 1000),
]


@pytest.fixture(scope="module")
def hf_image_processor():
    return Glm4vImageProcessor()


@pytest.fixture(scope="module")
def hf_video_processor():
    return Glm4vVideoProcessor(do_sample_frames=False)


@pytest.mark.parametrize("height,width", IMAGE_CASES)
@pytest.mark.parametrize("content", ["random", "gradient"])
def test_image_matches_hf(hf_image_processor, height, width, content):
    if content == "random":
        image = random_pixels(height, width, 3, seed=height * 10007 + width)
    else:
        image = gradient_image(height, width)
    reference = hf_image_processor(images=image, return_tensors="pt", input_data_format="channels_last")
    assert_matches(preprocess_image(image, GLM), reference["pixel_values"], reference["image_grid_thw"],
                   (height, width))


VIDEO_CASES = [
    # (frames, height, width): odd counts are padded by repeating the last frame; tiny sides scaled up;
    # grown to min_pixels over the clip; shrunk to max_pixels over the clip
    (2, 28, 28), (3, 20, 30), (4, 333, 517), (5, 64, 40), (6, 5, 700), (9, 60, 80), (3, 100, 1900),
    (8, 448, 448), (2, 3000, 4000), (7, 1500, 2000), (16, 1080, 1920),
]


@pytest.mark.parametrize("frames,height,width", VIDEO_CASES)
def test_video_matches_hf(hf_video_processor, frames, height, width):
    video = random_pixels(frames, height, width, 3, seed=frames * 7919 + height * 31 + width)
    reference = hf_video_processor(videos=[video], return_tensors="pt", input_data_format="channels_last")
    assert_matches(preprocess_video(video, GLM), reference["pixel_values_videos"], reference["video_grid_thw"],
                   (height, width))


def test_one_frame_video_is_the_repeated_two_frame_clip(hf_video_processor):
    frame = random_pixels(1, 100, 200, 3, seed=5)
    reference = hf_video_processor(videos=[np.concatenate([frame, frame])], return_tensors="pt",
                                   input_data_format="channels_last")
    assert_matches(preprocess_video(frame, GLM), reference["pixel_values_videos"], reference["video_grid_thw"],
                   (100, 200))


@pytest.mark.parametrize("shape", [(333, 517, 3), (3000, 4000, 3), (5, 64, 40, 3)])
def test_glm46v_processors_agree(shape):
    """GLM-4.6V's processors (their own classes) resize and patchify as GLM-4.1V's."""
    item = random_pixels(*shape, seed=sum(shape))
    config = released_preprocess("glm46v")
    if len(shape) == 3:
        reference = Glm46VImageProcessor()(images=item, return_tensors="pt", input_data_format="channels_last")
        assert_matches(preprocess_image(item, config), reference["pixel_values"], reference["image_grid_thw"],
                       shape[:2])
    else:
        reference = Glm46VVideoProcessor(do_sample_frames=False)(videos=[item], return_tensors="pt",
                                                                 input_data_format="channels_last")
        assert_matches(preprocess_video(item, config), reference["pixel_values_videos"],
                       reference["video_grid_thw"], shape[1:3])


sides = st.integers(min_value=1, max_value=12000)


@settings(max_examples=500, deadline=None)
@given(height=sides, width=sides, frames=st.integers(1, 768), video=st.booleans())
def test_patch_counts_equal_hf(hf_image_processor, hf_video_processor, height, width, frames, video):
    assume(max(height, width) <= MAX_ASPECT_RATIO * min(height, width))
    try:
        if video:
            expected = hf_video_processor.get_num_of_video_patches(max(frames, 2), height, width)
        else:
            expected = hf_image_processor.get_number_of_image_patches(height, width)
    except ValueError:  # the upscale of a tiny side truncates to int and can push the ratio just over 200
        with pytest.raises(PreprocessError, match="aspect ratio"):
            plan_video(frames, height, width, GLM) if video else plan_image(height, width, GLM)
        return
    plan = plan_video(frames, height, width, GLM) if video else plan_image(height, width, GLM)
    assert plan.num_patches == expected


def brute_force_sizes(count: int = 6000) -> list[tuple[int, int]]:
    """Sides on a geometric ladder, every pair within the aspect ratio, and random sizes and ratios."""
    ladder = sorted({round(1.17**k) for k in range(70)} | {27, 28, 29, 55, 56, 57})
    pairs = [(h, w) for h in ladder for w in ladder if max(h, w) <= MAX_ASPECT_RATIO * min(h, w)]
    pairs += [(3000, 4000), (4200, 4100), (1, 200), (200, 1)]
    rng = np.random.default_rng(0)
    for _ in range(count):
        short = int(rng.integers(1, 6000))
        long = min(int(short * math.exp(rng.uniform(0, math.log(MAX_ASPECT_RATIO)))), MAX_ASPECT_RATIO * short)
        pairs += [(short, long), (long, short)]
    return [(h, w) for h, w in pairs if h * w <= PreprocessConfig.max_input_pixels]


BOUND_CONFIGS = {
    "released": GLM,
    "min near max": replace(GLM, image_min_pixels=28 * 28 * 60, image_max_pixels=28 * 28 * 64),
    "small max (clamped sides)": replace(GLM, image_min_pixels=28 * 28, image_max_pixels=28 * 28 * 8),
    "temporal 1": replace(GLM, temporal_patch_size=1),
}


@pytest.mark.parametrize("name", BOUND_CONFIGS)
def test_largest_item_tokens_bounds_every_image(name):
    """Brute force over sizes and aspect ratios: no image sized as a clip has more patches than the bound.
    Videos kept tiny, so that the bound is the images' own: for the released values it is tight."""
    config = replace(BOUND_CONFIGS[name], video_min_pixels=1, video_max_pixels=28 * 28, max_video_frames=2)
    bound = largest_item_tokens(config)
    most = 0
    for height, width in brute_force_sizes():
        try:
            most = max(most, plan_image(height, width, config).num_patches)
        except PreprocessError:  # (a tiny side scaled up past the aspect ratio: refused as the processor does)
            continue
    assert most <= bound
    if name == "released":  # image_max_pixels / 2 / 14**2: the clip rule's share, not the image limit
        assert most == bound == GLM.image_max_pixels // 2 // 14**2


@settings(max_examples=400, deadline=None)
@given(patch=st.sampled_from([14, 16]), merge=st.sampled_from([1, 2]), temporal=st.sampled_from([1, 2, 3]),
       high=st.integers(1, 1 << 25), low_fraction=st.floats(0, 1), height=st.integers(1, 8000),
       width=st.integers(1, 8000))
def test_largest_item_tokens_bounds_images_sized_as_clips_under_other_limits(patch, merge, temporal, high,
                                                                            low_fraction, height, width):
    assume(max(height, width) <= MAX_ASPECT_RATIO * min(height, width))
    high = max(high, (patch * merge) ** 2)
    config = PreprocessConfig(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                              image_min_pixels=max(1, int(high * low_fraction)), image_max_pixels=high,
                              video_min_pixels=1, video_max_pixels=1, max_video_frames=1, image_resize_as_clip=True)
    try:
        plan = plan_image(height, width, config)
    except PreprocessError:
        return
    assert plan.num_patches <= largest_item_tokens(config)


def write_json(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("model_type", ["glm4v", "glm4v_moe", "glm46v", "glm4v_moe_vision"])
def test_a_glm_checkpoint_starts_from_the_glm_values_and_its_json_wins(tmp_path, model_type):
    write_json(tmp_path / "config.json", {"model_type": model_type, "vision_config": {"depth": 24}})
    size = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 500}
    Glm4vImageProcessor(size=size, image_mean=[0.5, 0.4, 0.3]).save_pretrained(tmp_path)
    Glm4vVideoProcessor(image_mean=[0.5, 0.4, 0.3]).save_pretrained(tmp_path)
    expected = replace(released_preprocess(model_type), image_min_pixels=size["shortest_edge"],
                       image_max_pixels=size["longest_edge"], image_mean=(0.5, 0.4, 0.3))
    assert PreprocessConfig.from_pretrained(tmp_path) == expected == preprocess_for(tmp_path)
    assert preprocess_for(tmp_path, {"max_video_frames": 100}) == replace(expected, max_video_frames=100)
    assert describe(expected, tmp_path).startswith(
        "preprocessing from preprocessor_config.json and video_preprocessor_config.json: image pixels 3136..392000 "
        "(sized as a 2-frame clip)")
    # what the file leaves out comes from the family: a GLM file without limits keeps GLM's
    write_json(tmp_path / "preprocessor_config.json", {"image_processor_type": "Glm4vImageProcessor"})
    (tmp_path / "video_preprocessor_config.json").unlink()
    assert PreprocessConfig.from_pretrained(tmp_path) == released_preprocess(model_type)


def test_hf_processors_from_the_checkpoint_equal_ours(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "glm4v"})
    Glm4vImageProcessor(size={"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 300}).save_pretrained(tmp_path)
    Glm4vVideoProcessor(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 2000}).save_pretrained(tmp_path)
    config = preprocess_for(tmp_path)
    hf_image = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    hf_video = Glm4vVideoProcessor.from_pretrained(tmp_path, do_sample_frames=False)
    for shape in [(300, 500, 3), (20, 30, 3), (7, 200, 300, 3), (4, 64, 96, 3)]:
        item = random_pixels(*shape, seed=sum(shape))
        if item.ndim == 3:
            reference = hf_image(images=item, return_tensors="pt", input_data_format="channels_last")
            pixels, grid = reference["pixel_values"], reference["image_grid_thw"]
        else:
            reference = hf_video(videos=[item], return_tensors="pt", input_data_format="channels_last")
            pixels, grid = reference["pixel_values_videos"], reference["video_grid_thw"]
        ours = preprocess_image(item, config) if item.ndim == 3 else preprocess_video(item, config)
        assert_matches(ours, pixels, grid, shape[-3:-1])


def test_a_glm_checkpoint_without_processor_files_gets_the_released_glm_values(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "glm46v"})
    assert preprocess_for(tmp_path) == released_preprocess("glm46v")
    assert describe(preprocess_for(tmp_path), tmp_path).startswith("preprocessing from the released GLM-4.xV defaults")


def test_without_config_json_a_checkpoint_starts_from_the_qwen3_vl_values_and_a_broken_one_is_named(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", {"patch_size": 14})
    assert PreprocessConfig.from_pretrained(tmp_path) == PreprocessConfig(patch_size=14)
    write_json(tmp_path / "config.json", {"model_type": "qwen3_vl"})
    assert PreprocessConfig.from_pretrained(tmp_path) == PreprocessConfig(patch_size=14)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="the checkpoint's preprocessing: .*config.json is not valid JSON"):
        preprocess_for(tmp_path)


def test_a_preset_of_the_glm_family_gets_the_glm_values(monkeypatch):
    """in_force asks presets.preset_model_type for a preset's family (the contract, whatever presets exist)."""
    monkeypatch.setattr(presets, "preset_model_type", lambda source: "glm46v")
    assert preprocess_for("random:any") == released_preprocess("glm46v")
    assert describe(released_preprocess("glm46v"), "random:any").startswith(
        "preprocessing from the released GLM-4.xV defaults: image pixels 12544..11760000 (sized as a 2-frame clip)")
    monkeypatch.undo()
    assert describe(preprocess_for("random:tiny"), "random:tiny").startswith(
        "preprocessing from the released Qwen3-VL defaults: image pixels 65536..16777216; video")


@pytest.mark.parametrize("source,model_type", [("random:glm-4.6v", "glm46v"), ("random:glm-4.1v-9b", "glm4v")])
def test_the_glm_presets_get_the_glm_values(source, model_type):
    assert presets.preset_model_type(source) == model_type
    assert preprocess_for(source) == released_preprocess(model_type)
    assert "the released GLM-4.xV defaults" in describe(preprocess_for(source), source)
