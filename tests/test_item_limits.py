"""The engine's default limit per item follows the preprocessing: whatever the pixel limits, patch and
merge sizes, every image and clip the resize rules accept (which follow Hugging Face's processors
operation for operation, test_preprocess_geometry.py) is admitted; an explicit max_item_tokens still
refuses larger items, naming the setting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vitserve.engine import EngineConfig
from vitserve.engine.admission import AdmissionError, admit
from vitserve.preprocess import PreprocessConfig, PreprocessError
from vitserve.preprocess.geometry import MAX_ASPECT_RATIO, largest_item_tokens, plan_image, plan_video
from vitserve.workers import WindowConfig


@st.composite
def configs(draw) -> PreprocessConfig:
    """Pixel limits from a few merged patches to the released ones, other patch geometries, and images
    sized by either rule (Qwen's image rule; GLM-4.xV's clip of one temporal patch)."""
    patch, merge, temporal = draw(st.sampled_from([14, 16])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    factor2 = (patch * merge) ** 2
    limits = []
    for kind in ("image", "video"):
        high = draw(st.integers(factor2, 1 << 25))
        limits += [draw(st.integers(1, high)), high]
    return PreprocessConfig(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                            image_min_pixels=limits[0], image_max_pixels=limits[1], video_min_pixels=limits[2],
                            video_max_pixels=limits[3], max_video_frames=draw(st.integers(1, 768)),
                            image_resize_as_clip=draw(st.booleans()))


sides = st.integers(1, 8000)


@settings(max_examples=600, deadline=None)
@given(config=configs(), height=sides, width=sides, frames=st.integers(1, 768), video=st.booleans())
def test_every_item_the_resize_rules_accept_is_within_the_default_limit(config, height, width, frames, video):
    assume(max(height, width) <= MAX_ASPECT_RATIO * min(height, width))
    assume(frames <= config.max_video_frames)
    try:
        plan = plan_video(frames, height, width, config) if video else plan_image(height, width, config)
    except PreprocessError:  # (a clip's sides scaled up past the aspect ratio: refused by the processor too)
        return
    assert plan.num_patches <= largest_item_tokens(config) <= EngineConfig(preprocess=config).item_token_limit


@pytest.mark.parametrize("shape", [(3000, 4000, 3), (4284, 5712, 3), (20, 720, 1280, 3), (16, 2160, 3840, 3)],
                         ids=["12 MP photo", "24 MP photo", "10 s of 720p at 2 fps", "8 s of 4K at 2 fps"])
def test_everyday_inputs_are_admitted_with_the_default_settings(shape):
    config = EngineConfig(window=WindowConfig(min_budget=256, max_budget=8192))
    item = np.zeros(shape, np.uint8)
    admitted = admit(item, config.preprocess, config.item_token_limit)
    planned = plan_video(*shape[:3], config.preprocess) if len(shape) == 4 else plan_image(*shape[:2], config.preprocess)
    assert admitted.grid == (planned.grid_t, planned.grid_h, planned.grid_w)
    assert admitted.tokens > 2 * 8192 or len(shape) == 4  # (over the old default limit for the photos)


def test_an_explicit_limit_refuses_larger_items_and_names_the_setting():
    config = EngineConfig(max_item_tokens=4096)
    with pytest.raises(AdmissionError, match=r"max_item_tokens, `vitserve serve --max-item-tokens`") as refused:
        admit(np.zeros((3000, 4000, 3), np.uint8), config.preprocess, config.item_token_limit)
    assert refused.value.code == "too_large"
    small = admit(np.zeros((1000, 1000, 3), np.uint8), config.preprocess, config.item_token_limit)
    assert small.tokens <= 4096


@pytest.mark.parametrize("shape", [(1, 250, 3), (2, 2, 1000, 3)], ids=["image 1x250", "clip 2x2x1000"])
def test_what_the_processor_refuses_is_refused_as_invalid_input(shape):
    """Past an aspect ratio of 200, Hugging Face's processors raise; admission answers invalid_input."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    item = np.zeros(shape, np.uint8)
    if len(shape) == 3:
        processor, arguments = transformers.Qwen2VLImageProcessor(), {"images": item}
    else:
        processor, arguments = Qwen3VLVideoProcessor(do_sample_frames=False), {"videos": [item]}
    with pytest.raises(ValueError):
        processor(**arguments, return_tensors="pt", input_data_format="channels_last")
    config = EngineConfig()
    with pytest.raises(AdmissionError, match="aspect ratio") as refused:
        admit(item, config.preprocess, config.item_token_limit)
    assert refused.value.code == "invalid_input"


def test_the_default_item_limit_keeps_one_items_outputs_within_max_item_output_bytes():
    """Without max_item_tokens, an item may take at most max_item_output_bytes of a worker's shared
    memory (Kimi K2.5's largest clip would take gigabytes); a max_item_tokens given is taken as it is."""
    import asyncio

    from vitserve import Engine
    from vitserve.engine import EngineError

    window = WindowConfig(min_budget=64, max_budget=512)
    row_bytes = (1 + 2) * 128 * 4  # random:tiny: an embedding and 2 deepstack rows of 128 float32

    async def limit_and_refusal(**settings) -> tuple[int, str | None]:
        async with Engine(EngineConfig(window=window, **settings)) as engine:
            try:
                await engine.encode([np.zeros((1200, 1200, 3), np.uint8)])  # 5625 patch tokens
                code = None
            except EngineError as err:
                code = err.code
            return engine.model.item_token_limit, code

    capped, code = asyncio.run(limit_and_refusal(max_item_output_bytes=1000 * row_bytes))
    assert capped == 4000 < EngineConfig(window=window).item_token_limit and code == "too_large"
    given_limit, code = asyncio.run(limit_and_refusal(max_item_output_bytes=1000 * row_bytes, max_item_tokens=8000))
    assert given_limit == 8000 and code is None
    with pytest.raises(ValueError, match="max_item_output_bytes"):
        EngineConfig(max_item_output_bytes=0)
