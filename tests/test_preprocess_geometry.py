"""Properties of the resize rule (smart_resize) and its agreement with Hugging Face's."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
from transformers.models.qwen2_vl import image_processing_qwen2_vl  # noqa: E402
from transformers.models.qwen3_vl import video_processing_qwen3_vl  # noqa: E402

from vitserve.preprocess import PreprocessConfig, PreprocessError  # noqa: E402
from vitserve.preprocess.geometry import plan_image, plan_video, smart_resize_image  # noqa: E402

CONFIG = PreprocessConfig()
PATCH, MERGE, FACTOR = CONFIG.patch_size, CONFIG.merge_size, CONFIG.factor
sides = st.integers(min_value=1, max_value=3000)


@settings(max_examples=400, deadline=None)
@given(height=sides, width=sides)
def test_image_grid_is_merge_aligned_within_pixel_limits_and_equals_hf(height, width):
    assume(max(height, width) / min(height, width) <= 200)
    plan = plan_image(height, width, CONFIG)
    assert plan.grid_h % MERGE == 0 and plan.grid_w % MERGE == 0
    assert plan.grid_h >= MERGE and plan.grid_w >= MERGE
    # Exact for images with aspect <= 200: the max(factor, ...) floor in the shrink branch
    # could only overshoot for an aspect ratio over max_pixels / factor**2 (16384 here), and
    # floor/ceil land on multiples of factor**2, so float error cannot cross a limit.
    pixels = plan.grid_h * plan.grid_w * PATCH * PATCH
    assert CONFIG.image_min_pixels <= pixels <= CONFIG.image_max_pixels
    expected = image_processing_qwen2_vl.smart_resize(
        height, width, factor=FACTOR, min_pixels=CONFIG.image_min_pixels, max_pixels=CONFIG.image_max_pixels
    )
    assert (plan.resized_height, plan.resized_width) == expected
    assert (plan.grid_t, plan.grid_h, plan.grid_w) == (1, expected[0] // PATCH, expected[1] // PATCH)


@settings(max_examples=400, deadline=None)
@given(frames=st.integers(min_value=1, max_value=768), height=sides, width=sides)
def test_video_grid_is_merge_aligned_and_equals_hf(frames, height, width):
    assume(max(height, width) / min(height, width) <= 200)
    temporal = CONFIG.temporal_patch_size
    sized_frames = max(frames, temporal)  # a 1-frame clip is sized as its padded 2-frame clip
    try:
        expected = video_processing_qwen3_vl.smart_resize(
            sized_frames,
            height,
            width,
            temporal_factor=temporal,
            factor=FACTOR,
            min_pixels=CONFIG.video_min_pixels,
            max_pixels=CONFIG.video_max_pixels,
        )
    except ValueError:
        # the upscale of a tiny side truncates to int and can push the ratio just over 200
        with pytest.raises(PreprocessError, match="aspect ratio"):
            plan_video(frames, height, width, CONFIG)
        return
    plan = plan_video(frames, height, width, CONFIG)
    assert (plan.resized_height, plan.resized_width) == expected
    assert plan.grid_t == -(-frames // temporal)
    assert plan.grid_h % MERGE == 0 and plan.grid_w % MERGE == 0
    assert plan.grid_h >= MERGE and plan.grid_w >= MERGE
    # The video rule decides with banker's-rounded frames but shrinks with the true count,
    # and floors each side at one factor: so the limits hold for the smaller count unless a
    # side sits on that floor, and the lower limit for the larger count.
    rounded_frames = round(sized_frames / temporal) * temporal
    per_frame = plan.resized_height * plan.resized_width
    if min(plan.resized_height, plan.resized_width) > FACTOR:
        assert min(sized_frames, rounded_frames) * per_frame <= CONFIG.video_max_pixels
    assert max(sized_frames, rounded_frames) * per_frame >= CONFIG.video_min_pixels


def test_known_image_grids():
    """The token table of the reference notes (checkpoint config)."""
    known = {
        (224, 224): (16, 16),
        (336, 336): (20, 20),  # 10.5 rounds to 10 (banker's rounding)
        (1008, 1008): (64, 64),  # 31.5 rounds to 32
        (1080, 1920): (68, 120),
        (64, 64): (16, 16),
        (8192, 8192): (256, 256),
    }
    for (height, width), grid in known.items():
        plan = plan_image(height, width, CONFIG)
        assert (plan.grid_h, plan.grid_w) == grid


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(PreprocessError, match="aspect ratio"):
        smart_resize_image(1, 201, factor=32, min_pixels=65536, max_pixels=16777216)


@settings(max_examples=300, deadline=None)
@given(frames=st.integers(min_value=2, max_value=768), height=sides, width=sides,
       limits=st.sampled_from([(4096, 25165824), (128 * 32 * 32, 768 * 32 * 32), (16384, 2_000_000)]),
       frame_tokens=st.sampled_from([768, 256, 64]), cap=st.booleans())
def test_video_patch_counts_equal_hf_with_and_without_the_per_frame_cap(frames, height, width, limits, frame_tokens,
                                                                        cap):
    """Hugging Face's count (the one its processor's resize uses) for clips of two frames or more
    (HF refuses fewer), under other pixel limits, with the reference per-frame cap on and off."""
    assume(max(height, width) / min(height, width) <= 200)
    low, high = limits
    config = PreprocessConfig(video_min_pixels=low, video_max_pixels=high, video_cap_pixels_per_frame=cap,
                              video_max_frame_tokens=frame_tokens)
    hf = video_processing_qwen3_vl.Qwen3VLVideoProcessor(
        size={"shortest_edge": low, "longest_edge": high}, cap_pixels_per_frame=cap, max_video_tokens=frame_tokens)
    try:
        expected = hf.get_num_of_video_patches(frames, height, width)
    except ValueError:
        with pytest.raises(PreprocessError, match="aspect ratio"):
            plan_video(frames, height, width, config)
        return
    assert plan_video(frames, height, width, config).num_patches == expected
