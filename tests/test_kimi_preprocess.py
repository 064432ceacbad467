"""Kimi K2.5 preprocessing: `released_preprocess("kimi_k25")` equals Hugging Face's Kimi_K25ImageProcessor and
Kimi_K25VideoProcessor (never scaled up, patch limits counted in whole input patches, zeros padded at the bottom
and right, rows in raster order with no temporal patch; a video is one item whose rows are HF's chunks' rows),
and the engine's item bound holds (the settings and a checkpoint's files: test_kimi_checkpoint_preprocess.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("torchvision")
pytest.importorskip("transformers")
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig  # noqa: E402
from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor  # noqa: E402
from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor  # noqa: E402

import vitserve.preprocess.api as preprocess_api  # noqa: E402
from vitserve.preprocess import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    preprocess_batch,
    preprocess_image,
    preprocess_video,
)
from vitserve.preprocess.config import preprocess_family, released_preprocess  # noqa: E402
from vitserve.preprocess.geometry import MAX_ASPECT_RATIO, largest_item_tokens, plan_image, plan_video  # noqa: E402
from vitserve.preprocess.resize import resize_uint8_portable  # noqa: E402
from vitserve.preprocess.validate import check_frames  # noqa: E402

KIMI = released_preprocess("kimi_k25")
# One uint8 step of resize rounding after normalising by std 0.5, plus float32 slack.
ROUNDING = 1 / 255 / 0.5 + 1e-5


def test_released_values_are_the_hugging_face_processors():
    image, video = Kimi_K25ImageProcessor(), Kimi_K25VideoProcessor()
    assert (KIMI.patch_size, KIMI.merge_size) == (image.patch_size, image.merge_size) == (video.patch_size,
                                                                                          video.merge_size) == (14, 2)
    assert KIMI.image_max_patches == image.max_patches == 16384
    assert KIMI.video_frame_max_patches == video.max_patches == 4096
    assert KIMI.max_patches_per_side == image.size.max_height == image.size.max_width == video.size.max_height == 512
    assert KIMI.image_mean == tuple(image.image_mean) == tuple(video.image_mean) == (0.5, 0.5, 0.5)
    assert KIMI.image_std == tuple(image.image_std) == tuple(video.image_std) == (0.5, 0.5, 0.5)
    # one frame per row (HF's video temporal_patch_size, 4, is the chunk the tower averages, not a pixel patch)
    assert (KIMI.temporal_patch_size, KIMI.patch_dim, KIMI.resize_rule, KIMI.raster_patches) == (1, 588, "navit", True)
    assert video.temporal_patch_size == 4
    bare = Kimi_K25VisionConfig().model_type
    assert bare == "kimi_k25_vision" and released_preprocess(bare) == KIMI
    assert preprocess_family("kimi_k25") == preprocess_family(bare) == "Kimi K2.5"
    assert released_preprocess("qwen3_vl") == released_preprocess(None) == PreprocessConfig()
    assert PreprocessConfig().resize_rule == "smart_resize" and not PreprocessConfig().raster_patches


def random_pixels(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def gradient_image(height: int, width: int) -> np.ndarray:
    rows = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    cols = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    return np.stack([rows, cols, (rows + cols) / 2], axis=-1).round().astype(np.uint8)  # (H, W, 3)


def as_rows(pixel_values: torch.Tensor) -> torch.Tensor:
    """HF's Kimi processors return (N, C, P, P): our rows are those, flattened."""
    return pixel_values.reshape(pixel_values.shape[0], -1)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, resized: bool) -> None:
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    difference = (ours - reference.float()).abs().max().item() if len(ours) else 0.0
    assert difference <= ROUNDING if resized else difference == 0.0


@pytest.fixture(scope="module")
def hf_image_processor():
    return Kimi_K25ImageProcessor()


@pytest.fixture(scope="module")
def hf_video_processor():
    return Kimi_K25VideoProcessor(do_sample_frames=False)


IMAGE_CASES = [
    # tiny (never scaled up: padded to one merged patch or a few)
    (1, 1), (1, 200), (5, 700), (13, 40), (27, 27), (28, 28), (29, 29), (30, 45),
    # kept, padded to multiples of 28
    (28, 56), (333, 517), (100, 1900), (1000, 1001), (1792, 1792),
    # at the budget: 128x128 whole patches are kept (and 1793 pads to 130x130), 129x129 are shrunk
    (1793, 1793), (1806, 1806), (1805, 1820),
    # at the side limit (512 patches, 7168 pixels): kept, then shrunk by the side alone
    (7168, 100), (7169, 100), (100, 7200), (8000, 100),
    # extreme aspect ratios (up to 200), and the most patches the rule gives (17856, over the budget)
    (30, 6000), (6000, 30), (14, 2800), (7200, 36), (489, 7095),
    # huge
    (5000, 5000), (3000, 4000), (6000, 8000),
]


@pytest.mark.parametrize("height,width", IMAGE_CASES)
@pytest.mark.parametrize("content", ["random", "gradient"])
def test_image_matches_hf(hf_image_processor, height, width, content):
    if content == "random":
        image = random_pixels(height, width, 3, seed=height * 10007 + width)
    else:
        image = gradient_image(height, width)
    reference = hf_image_processor(images=image, return_tensors="pt", input_data_format="channels_last")
    ours = preprocess_image(image, KIMI)
    plan = plan_image(height, width, KIMI)
    assert torch.equal(ours.grid_thw, reference["image_grid_thw"])
    assert plan.num_patches == hf_image_processor.get_number_of_image_patches(height, width)
    assert_close(ours.pixel_values, as_rows(reference["pixel_values"]), plan.needs_resize)


def test_rows_are_raster_patches_and_the_padding_is_normalised_zeros():
    image = random_pixels(30, 45, 3, seed=3)  # kept, padded to 56x56: 4x4 patches
    ours = preprocess_image(image, KIMI)
    assert ours.grid_thw.tolist() == [[1, 4, 4]]
    padded = np.zeros((56, 56, 3), np.float32)
    padded[:30, :45] = image
    normalised = (padded / 255 - 0.5) / 0.5
    expected = normalised.reshape(4, 14, 4, 14, 3).transpose(0, 2, 4, 1, 3).reshape(16, 588)  # (h, w) x (C, P, P)
    assert np.allclose(ours.pixel_values.numpy(), expected, atol=1e-6)
    assert (ours.pixel_values[15] == -1).all()  # the bottom-right patch is all padding


VIDEO_SIZES = [(100, 150), (480, 640), (720, 1280), (1080, 1920), (20, 3000), (1, 1)]


# every frame count from 1 to 9 at each size, but the 1080p clip only up to 5 (its chunking is the same)
VIDEO_CASES = [(frames, height, width) for height, width in VIDEO_SIZES for frames in range(1, 10)
               if frames <= 5 or height * width <= 1_000_000]


@pytest.mark.parametrize("frames,height,width", VIDEO_CASES)
def test_video_is_hf_chunks_concatenated(hf_video_processor, frames, height, width):
    """HF cuts a video into chunks of 4 frames, the last one holding what is left (not padded), each its own
    grid row; ours is one item: the same rows in order, t the sum of the chunks' t."""
    video = random_pixels(frames, height, width, 3, seed=frames * 7919 + height * 31 + width)
    reference = hf_video_processor(videos=[video], return_tensors="pt", input_data_format="channels_last")
    chunks = reference["video_grid_thw"]
    assert chunks[:, 0].tolist() == [4] * (frames // 4) + ([frames % 4] if frames % 4 else [])
    assert reference["num_chunks_per_video"].tolist() == [len(chunks)]
    ours = preprocess_video(video, KIMI)
    assert ours.grid_thw.tolist() == [[int(chunks[:, 0].sum()), *chunks[0, 1:].tolist()]]
    assert (chunks[:, 1:] == chunks[0, 1:]).all()
    assert_close(ours.pixel_values, as_rows(reference["pixel_values_videos"]),
                 plan_video(frames, height, width, KIMI).needs_resize)


def test_video_frames_get_their_own_budget_not_the_images():
    """1080p: 77 x 137 whole patches, within the image budget (kept, padded), over the frame budget (shrunk to
    672 x 1196, padded to 672 x 1204: 4128 patches, over 4096, as the budget counts the input's whole patches)."""
    video, image = plan_video(3, 1080, 1920, KIMI), plan_image(1080, 1920, KIMI)
    sizes = (image.resized_height, image.resized_width, image.padded_height, image.padded_width)
    assert sizes == (1080, 1920, 1092, 1932)
    assert (image.grid_t, image.grid_h, image.grid_w) == (1, 78, 138)
    sizes = (video.resized_height, video.resized_width, video.padded_height, video.padded_width)
    assert sizes == (672, 1196, 672, 1204)
    assert (video.grid_t, video.grid_h, video.grid_w) == (3, 48, 86)


def mixed_items() -> list[np.ndarray]:
    return [
        random_pixels(333, 517, 3, seed=10),
        random_pixels(5, 64, 40, 3, seed=11),
        random_pixels(5, 64, 40, 3, seed=12),  # adjacent twin of item 1: one patchify call
        gradient_image(2000, 1500),  # shrunk
        random_pixels(333, 517, 3, seed=13),  # same sizes as item 0, not adjacent
        random_pixels(4, 333, 517, 3, seed=14),  # same input size as item 0
        random_pixels(7, 720, 1280, 3, seed=15),  # frames shrunk and padded
        random_pixels(28, 28, 3, seed=16),
        random_pixels(1, 100, 200, 3, seed=17),
        random_pixels(9, 64, 40, 3, seed=18),  # same sizes as items 1-2, other frame count
    ]


def per_item_reference(items: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    results = [preprocess_image(item, KIMI) if item.ndim == 3 else preprocess_video(item, KIMI) for item in items]
    return torch.cat([r.pixel_values for r in results]), torch.cat([r.grid_thw for r in results])


def test_batch_equals_per_item_in_input_order():
    reference_pixels, reference_grid = per_item_reference(mixed_items())
    batch = preprocess_batch(mixed_items(), KIMI, device="cpu")
    assert torch.equal(batch.grid_thw, reference_grid)
    assert torch.equal(batch.pixel_values, reference_pixels)


def test_batch_with_device_kernel_equals_per_item(monkeypatch):
    """The integer resize that runs on GPUs, exercised on the CPU through the batched path."""

    def portable_only(frames, height, width):
        return frames if frames.shape[-2:] == (height, width) else resize_uint8_portable(frames, height, width)

    monkeypatch.setattr(preprocess_api, "resize_uint8", portable_only)
    reference_pixels, reference_grid = per_item_reference(mixed_items())
    batch = preprocess_batch(mixed_items(), KIMI)
    assert torch.equal(batch.grid_thw, reference_grid)
    assert (batch.pixel_values - reference_pixels).abs().max().item() <= ROUNDING


@pytest.mark.gpu
def test_batch_on_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    items = mixed_items() + [random_pixels(6000, 8000, 3, seed=19), random_pixels(8, 1080, 1920, 3, seed=20)]
    reference_pixels, reference_grid = per_item_reference(items)
    batch = preprocess_batch(items, KIMI, device="cuda")
    assert batch.pixel_values.device.type == "cuda"
    assert torch.equal(batch.grid_thw, reference_grid)
    assert (batch.pixel_values.cpu() - reference_pixels).abs().max().item() <= ROUNDING
    on_device = preprocess_batch([torch.from_numpy(item).cuda() for item in items], KIMI, device="cuda")
    assert torch.equal(on_device.pixel_values, batch.pixel_values)


sides = st.integers(min_value=1, max_value=12000)


@settings(max_examples=500, deadline=None)
@given(height=sides, width=sides, frames=st.integers(1, 768), video=st.booleans())
def test_patch_counts_equal_hf(hf_image_processor, hf_video_processor, height, width, frames, video):
    assume(max(height, width) <= MAX_ASPECT_RATIO * min(height, width))
    if video:
        expected = hf_video_processor.get_num_of_video_patches(frames, height, width)
        plan = plan_video(frames, height, width, KIMI)
    else:
        expected = hf_image_processor.get_number_of_image_patches(height, width)
        plan = plan_image(height, width, KIMI)
    assert plan.num_patches == expected


def brute_force_sizes(count: int = 6000) -> list[tuple[int, int]]:
    """Sides on a geometric ladder, every pair within the aspect ratio, sizes around the limits' edges, and
    random sizes and ratios."""
    ladder = sorted({round(1.17**k) for k in range(70)} | {13, 14, 15, 27, 28, 29, 1792, 1793, 1806, 7168, 7169})
    pairs = [(h, w) for h in ladder for w in ladder if max(h, w) <= MAX_ASPECT_RATIO * min(h, w)]
    pairs += [(short, long) for short in range(100, 520) for long in range(6600, 7300, 37)]  # near the worst
    rng = np.random.default_rng(0)
    for _ in range(count):
        short = int(rng.integers(1, 6000))
        long = min(int(short * math.exp(rng.uniform(0, math.log(MAX_ASPECT_RATIO)))), MAX_ASPECT_RATIO * short)
        pairs += [(short, long), (long, short)]
    return [(h, w) for h, w in pairs if h * w <= PreprocessConfig.max_input_pixels]


def test_largest_item_tokens_bounds_every_image_and_frame():
    """Brute force over sizes and aspect ratios: the bound holds, within a few percent of the worst found
    (the budget counts whole input patches and padding adds more: 17856 patches for a 16384 budget)."""
    config = replace(KIMI, max_video_frames=1)
    frame_config = replace(KIMI, max_video_frames=1, image_max_patches=1)
    most_image = most_frame = 0
    for height, width in brute_force_sizes():
        most_image = max(most_image, plan_image(height, width, config).num_patches)
        most_frame = max(most_frame, plan_video(1, height, width, config).num_patches)
    assert most_image == 17856 and most_frame >= 5300
    image_bound, frame_bound = largest_item_tokens(config), largest_item_tokens(frame_config)
    assert most_image <= image_bound <= 1.02 * most_image
    assert most_frame <= frame_bound <= 1.05 * most_frame
    assert largest_item_tokens(KIMI) == KIMI.max_video_frames * frame_bound  # a 768-frame clip of the worst frames


@settings(max_examples=400, deadline=None)
@given(patch=st.sampled_from([14, 16]), merge=st.sampled_from([1, 2]), budget=st.integers(1, 1 << 16),
       side=st.integers(1, 1024), frames=st.integers(1, 12), height=st.integers(1, 9000), width=st.integers(1, 9000),
       video=st.booleans())
def test_largest_item_tokens_bounds_items_under_other_limits(patch, merge, budget, side, frames, height, width, video):
    assume(max(height, width) <= MAX_ASPECT_RATIO * min(height, width))
    config = replace(KIMI, patch_size=patch, merge_size=merge, image_max_patches=budget,
                     video_frame_max_patches=max(1, budget // 4), max_patches_per_side=side, max_video_frames=12)
    plan = plan_video(frames, height, width, config) if video else plan_image(height, width, config)
    assert plan.num_patches <= largest_item_tokens(config)


@pytest.mark.parametrize("height,width", [(10, 2010), (2, 3000), (4000, 5), (1, 7200)])
def test_aspect_ratios_past_qwens_limit_are_accepted_as_hf_accepts_them(hf_image_processor, height, width):
    """Qwen's smart_resize refuses an aspect ratio over 200; Kimi K2.5's processor has no such limit."""
    image = random_pixels(height, width, 3, seed=height + width)
    check_frames(image, KIMI, kind="image")
    reference = hf_image_processor(images=image, return_tensors="pt", input_data_format="channels_last")
    ours = preprocess_image(image, KIMI)
    assert torch.equal(ours.grid_thw, reference["image_grid_thw"])
    assert_close(ours.pixel_values, as_rows(reference["pixel_values"]), plan_image(height, width, KIMI).needs_resize)
    with pytest.raises(PreprocessError, match="aspect ratio"):  # (as for Qwen's rule)
        check_frames(image, replace(KIMI, resize_rule="smart_resize"), kind="image")
