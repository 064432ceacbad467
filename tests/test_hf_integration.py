"""vitserve.integrations.transformers: a tiny random Qwen3-VL saved by `save_pretrained` and served by
`vitserve serve` (and by an engine embedded in this process) feeds the model's unchanged `generate()`,
which then gives the tokens of Hugging Face's own tower, for images, a video and a mix; `verify`
says yes for the model's tower and no, clearly, for a tower with other weights."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import transformers
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from hf_checkpoints import TINY_TEXT, TINY_VISION
from served import served

from vitserve.engine import EngineConfig
from vitserve.integrations.transformers import attach, detach, verify
from vitserve.workers import WindowConfig

IMAGE, VIDEO, START, END = 150, 151, 152, 153  # the placeholder and bracket tokens of this tiny vocabulary
RELEASED = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
NEW_TOKENS = 12
BUDGETS = ("--min-budget", "64", "--max-budget", "512")


def tiny_vlm(seed: int) -> transformers.Qwen3VLForConditionalGeneration:
    config = transformers.Qwen3VLConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 160},
                                        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                                        vision_end_token_id=END)
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vlm") / "tiny-qwen3-vl"
    tiny_vlm(seed=3).save_pretrained(directory)
    transformers.Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216},
                                       **RELEASED).save_pretrained(directory)
    Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, **RELEASED).save_pretrained(directory)
    return directory


def prompts(directory) -> dict[str, dict]:
    """What a Qwen3-VL processor gives for a prompt with images, a video, or both: each image's
    placeholders between brackets, each temporal patch of a video in brackets of its own."""
    image_processor = transformers.AutoImageProcessor.from_pretrained(directory)
    video_processor = Qwen3VLVideoProcessor.from_pretrained(directory, do_sample_frames=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 96, 3), (300, 200, 3))]
    video = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    image_inputs = image_processor(images=images, return_tensors="pt", input_data_format="channels_last")
    video_inputs = video_processor(videos=[video], return_tensors="pt", input_data_format="channels_last")

    def placeholders(grids, token: int, per_frame: bool) -> list[int]:
        ids = []
        for t, h, w in grids.tolist():
            for chunk in ([h * w // 4] * t if per_frame else [t * h * w // 4]):
                ids += [START] + [token] * chunk + [END]
        return ids

    def prompt(*parts: list[int], **arrays) -> dict:
        ids = torch.tensor([[1, 5, 9] + sum(parts, []) + [17, 33, 2]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **arrays}

    image_part = placeholders(image_inputs["image_grid_thw"], IMAGE, per_frame=False)
    video_part = placeholders(video_inputs["video_grid_thw"], VIDEO, per_frame=True)
    return {"images": prompt(image_part, **image_inputs), "video": prompt(video_part, **video_inputs),
            "mix": prompt(video_part, image_part, **image_inputs, **video_inputs)}


def generate(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def check_generate_and_verify(checkpoint, encoder) -> None:
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    cases = prompts(checkpoint)
    own = {name: generate(model, inputs) for name, inputs in cases.items()}
    attached = attach(model, encoder)
    try:
        calls = []
        features = model.model.get_image_features

        @functools.wraps(features)  # (generate() picks its arguments by the parameters' names)
        def counted(*args, **kwargs):
            calls.append(1)
            return features(*args, **kwargs)

        model.model.get_image_features = counted
        for name, inputs in cases.items():
            assert generate(model, inputs) == own[name], name
        assert calls, "generate() took its image features elsewhere"
        verdict = verify(model)
        assert verdict.ok and verdict.relative_error < 1e-5, verdict.message
        assert "matches" in str(verdict) and "fingerprint equal" in str(verdict)

        stranger = tiny_vlm(seed=4)  # the same architecture, other weights
        refused = verify(stranger, attached.encoder)
        assert not refused.ok and "does NOT match" in refused.message, refused.message
        assert "fingerprint differs" in refused.message
    finally:
        detach(model)
    assert "get_image_features" not in model.model.__dict__  # its own tower again


def test_generate_through_a_served_engine_equals_hugging_faces_own(checkpoint, tmp_path):
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", str(checkpoint), *BUDGETS):
        check_generate_and_verify(checkpoint, endpoint)


def test_generate_through_an_embedded_engine_equals_hugging_faces_own(checkpoint):
    config = EngineConfig(model=str(checkpoint), window=WindowConfig(min_budget=64, max_budget=512))
    check_generate_and_verify(checkpoint, config)


def test_a_served_model_with_other_outputs_is_refused_at_attach(tmp_path):
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", "random:tiny", *BUDGETS):  # rows of 128, the tiny VLM takes 32
        with pytest.raises(ValueError, match="gives rows of width 128 with 2 deepstack layers; this model takes 32"):
            attach(tiny_vlm(seed=3), endpoint)
