"""Qwen3.5's vision tower (the Qwen3-VL tower without deepstack): checkpoints Hugging Face saves load,
in both prefixes and sharded, and give HF's outputs in float32 for images, non-square grids, packed
items, videos and mixes; `vitserve serve` serves one with results equal to the eager model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from hf_reference import perturb_, random_patches
from served import served
from test_model_parity import CASES, TOLERANCE, assert_rows_match, relative_error

from vitserve import Client
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image, preprocess_video

# Small towers that vary depth, head dims (16, 20, 72) and position grids.
TOWERS = {
    "hd16-pos8x8": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=96,
                        num_position_embeddings=64),
    "hd20-pos20x20": dict(depth=3, hidden_size=80, intermediate_size=100, num_heads=4, out_hidden_size=40,
                          num_position_embeddings=400),
    "hd72-pos12x12": dict(depth=1, hidden_size=144, intermediate_size=96, num_heads=2, out_hidden_size=48,
                          num_position_embeddings=144),
}
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, vocab_size=128)


def hf_tower(name: str, seed: int = 0) -> transformers.Qwen3_5VisionModel:
    torch.manual_seed(seed)
    tower = transformers.Qwen3_5VisionModel(transformers.Qwen3_5VisionConfig(**TOWERS[name])).eval()
    perturb_(tower, seed)
    return tower


def check(model, tower, grids, seed: int = 0) -> None:
    pixel_values, grid_thw = random_patches(grids, seed)
    with torch.no_grad():
        reference = tower(pixel_values, grid_thw=grid_thw).pooler_output
    assert_rows_match(model, pixel_values, grid_thw, reference)


@pytest.fixture(scope="module", params=sorted(TOWERS))
def bare_pair(request, tmp_path_factory):
    tower = hf_tower(request.param, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    tower.save_pretrained(directory)
    return load_model(directory), tower


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bare_tower_matches_hf(bare_pair, case):
    model, tower = bare_pair
    assert model.geometry.num_deepstack == 0 and model.model_type == "qwen3_5_vision"
    check(model, tower, CASES[case])


def save_full(tower, directory) -> None:
    """A whole tiny Qwen3.5 around `tower`, saved in shards: vision weights under `model.visual.`."""
    config = transformers.Qwen3_5Config(vision_config=tower.config.to_dict(), text_config=TEXT)
    model = transformers.Qwen3_5ForConditionalGeneration(config)
    model.model.visual.load_state_dict(tower.state_dict())
    model.save_pretrained(directory, max_shard_size="40KB")


@pytest.mark.parametrize("prefix", ["model.visual.", "visual."])
def test_a_sharded_full_checkpoint_matches_hf_in_both_prefixes(tmp_path, prefix):
    tower = hf_tower("hd20-pos20x20", seed=5)
    full = tmp_path / "full"
    save_full(tower, full)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and json.loads((full / "config.json").read_text())[
        "model_type"] == "qwen3_5"
    directory = full
    if prefix == "visual.":  # the older layout: one file, `visual.*` and `language_model.*`
        directory = tmp_path / "visual"
        directory.mkdir()
        tensors = {}
        for file in sorted(full.glob("*.safetensors")):
            tensors.update({name.removeprefix("model."): t for name, t in load_file(file).items()})
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(full / "config.json", directory / "config.json")
    model = load_model(directory)
    assert model.model_type == "qwen3_5" and model.geometry.num_deepstack == 0
    check(model, tower, CASES["images-and-videos"])


def test_the_released_presets_have_no_deepstack_and_say_their_family():
    model = load_model("random:qwen3.5-0.8b")
    assert (model.model_type, model.geometry.num_deepstack, model.config.head_dim) == ("qwen3_5", 0, 64)


def test_serve_gives_the_eager_models_results(tmp_path):
    tower = hf_tower("hd72-pos12x12", seed=2)
    checkpoint = tmp_path / "qwen3.5-tiny"
    save_full(tower, checkpoint)
    model = load_model(checkpoint)
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)]
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", str(checkpoint), "--min-budget", "64", "--max-budget", "512"):
        with Client(endpoint) as client, client.encode(items) as result:
            assert (client.model.model_type, client.model.num_deepstack) == ("qwen3_5", 0)
            for item, served_item in zip(items, result.items):
                patches = preprocess_video(item) if item.ndim == 4 else preprocess_image(item)
                expected = model.encode_patches(patches.pixel_values, patches.grid_thw)
                torch.testing.assert_close(served_item.embeddings, expected.embeddings, atol=1e-5, rtol=1e-5)
                assert served_item.deepstack.shape == (0, *expected.embeddings.shape)
                assert served_item.packed.shape == expected.embeddings.shape  # vLLM's rows: the embedding alone


def test_generate_of_a_qwen3_5_model_takes_its_features_from_vitserve(tmp_path):
    """The transformers integration with Qwen3.5 (no deepstack): an unchanged generate() gives the
    tokens of the model's own tower; verify says the tower is its own."""
    from vitserve.engine import EngineConfig
    from vitserve.integrations.transformers import attach, detach, verify
    from vitserve.workers import WindowConfig

    image_token, start, end = 150, 152, 153
    vision = {**TOWERS["hd16-pos8x8"], "out_hidden_size": TEXT["hidden_size"]}  # (rows go into the text stream)
    text = {**TEXT, "vocab_size": 160, "layer_types": ["linear_attention", "full_attention"]}  # (generate needs one)
    config = transformers.Qwen3_5Config(vision_config=vision, text_config=text,
                                        image_token_id=image_token, video_token_id=151, vision_start_token_id=start,
                                        vision_end_token_id=end)
    torch.manual_seed(4)
    model = transformers.Qwen3_5ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "vlm")
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    patches = preprocess_image(image)
    t, h, w = patches.grid_thw[0].tolist()
    ids = torch.tensor([[1, 5, start] + [image_token] * (t * h * w // 4) + [end, 17, 2]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": patches.pixel_values,
              "image_grid_thw": patches.grid_thw}

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    own = generate()
    attach(model, EngineConfig(model=str(tmp_path / "vlm"), window=WindowConfig(min_budget=64, max_budget=512)))
    try:
        assert generate() == own
        verdict = verify(model)
        assert verdict.ok and "fingerprint equal" in str(verdict), verdict.message
    finally:
        detach(model)


def test_the_benchs_hugging_face_baseline_is_the_familys_own_tower(bare_pair):
    """`vitserve bench` times HF's tower of the model's family (here Qwen3_5VisionModel) with our weights."""
    from vitserve.bench.runner_bench import hf_twin

    model, _ = bare_pair
    twin = hf_twin(model)
    assert type(twin).__name__ == "Qwen3_5VisionModel"
    pixel_values, grid_thw = random_patches(CASES["images-and-videos"])
    with torch.no_grad():
        reference = twin(pixel_values, grid_thw=grid_thw).pooler_output
    assert relative_error(model.encode_patches(pixel_values, grid_thw).embeddings, reference) <= TOLERANCE
