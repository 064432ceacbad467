"""GLM-4.1V / 4.5V / 4.6V vision towers: checkpoints Hugging Face saves load (bare, whole models in
both prefixes, sharded; glm4v, glm4v_moe and glm46v configs) and give HF's Glm4vVisionModel outputs in
float32 for images, non-square grids, packed items, videos and mixes; presets have the released
shapes; `vitserve serve` serves one with results equal to the eager model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from hf_reference import greedy_tokens, perturb_
from served import served
from test_model_parity import CASES, assert_rows_match, eager

from vitserve import Client
from vitserve.models import load_model
from vitserve.models.glm4v.config import Glm4vVisionConfig
from vitserve.models.glm4v.model import Glm4vVisionTower
from vitserve.models.presets import preset_config
from vitserve.preprocess import preprocess_image, preprocess_video

# Small towers that vary depth, head dims (16, 20, 24, 40), attention biases and position tables
# (the released one is 24x24; 8x8 and 12x12 make the bicubic taps clamp at the border more often).
TOWERS = {
    "hd16-pos8x8": dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=48, intermediate_size=80,
                        image_size=112),
    "hd20-pos24x24-qkv-bias": dict(depth=3, hidden_size=80, num_heads=4, out_hidden_size=40, intermediate_size=56,
                                   attention_bias=True),
    "hd40-pos12x12": dict(depth=1, hidden_size=80, num_heads=2, out_hidden_size=96, intermediate_size=64,
                          image_size=168),
    "hd24-pos24x24": dict(depth=2, hidden_size=96, num_heads=4, out_hidden_size=128, intermediate_size=160),
}
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            vocab_size=128)
PATCH_DIM = 3 * 2 * 14 * 14


def hf_tower(name: str, seed: int = 0) -> transformers.Glm4vVisionModel:
    torch.manual_seed(seed)
    tower = transformers.Glm4vVisionModel(transformers.Glm4vVisionConfig(**TOWERS[name])).eval()
    perturb_(tower, seed)
    return tower


def reference(tower, pixel_values: torch.Tensor, grids: list) -> torch.Tensor:
    """HF's outputs: as its get_video_features does, a video of t temporal patches is t images."""
    frames = [(1, h, w) for t, h, w in grids for _ in range(t)]
    with torch.no_grad():
        return tower(pixel_values, grid_thw=torch.tensor(frames)).pooler_output


def check(model, tower, grids, seed: int = 0) -> None:
    tokens = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(tokens, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    assert_rows_match(model, pixel_values, grids, reference(tower, pixel_values, grids))


@pytest.fixture(scope="module", params=sorted(TOWERS))
def bare_pair(request, tmp_path_factory):
    tower = hf_tower(request.param, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    tower.save_pretrained(directory)
    return load_model(directory), tower


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bare_tower_matches_hf(bare_pair, case):
    model, tower = bare_pair
    assert isinstance(model, Glm4vVisionTower) and model.model_type == "glm4v_vision"
    assert model.geometry.num_deepstack == 0 and model.geometry.patch_dim == PATCH_DIM
    check(model, tower, CASES[case])


def test_a_tower_built_in_code_matches_hf_on_grids_past_its_table():
    """Grids far larger than the 24x24 table (the sampling interpolates) and one row or column of
    merge blocks (every tap clamped at a border)."""
    tower = hf_tower("hd24-pos24x24", seed=3)
    model = Glm4vVisionTower(Glm4vVisionConfig(**TOWERS["hd24-pos24x24"])).eval()
    model.load_state_dict(tower.state_dict())
    check(model, tower, [(1, 2, 2), (1, 2, 60), (1, 60, 2), (1, 50, 36)], seed=1)


def save_full(tower, directory, model_type: str = "glm4v") -> None:
    """A whole tiny GLM-4.xV model around `tower`, saved in shards: vision weights under `model.visual.`."""
    if model_type == "glm46v":  # GLM-4.6V: its own config around GLM-4.1V's vision and text configs
        config = transformers.Glm46VConfig(vision_config={**tower.config.to_dict(), "model_type": "glm4v_vision"},
                                           text_config={**TEXT, "model_type": "glm4v_text"})
        model = transformers.Glm46VForConditionalGeneration(config)
    else:
        config = transformers.Glm4vConfig(vision_config=tower.config.to_dict(), text_config=TEXT)
        model = transformers.Glm4vForConditionalGeneration(config)
    model.model.visual.load_state_dict(tower.state_dict())
    model.save_pretrained(directory, max_shard_size="40KB")


@pytest.mark.parametrize("model_type, prefix", [("glm4v", "model.visual."), ("glm4v", "visual."),
                                                ("glm46v", "model.visual.")])
def test_a_sharded_full_checkpoint_matches_hf(tmp_path, model_type, prefix):
    tower = hf_tower("hd20-pos24x24-qkv-bias", seed=5)
    full = tmp_path / "full"
    save_full(tower, full, model_type)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((full / "config.json").read_text())["model_type"] == model_type
    directory = full
    if prefix == "visual.":  # one file, vision tensors under `visual.`
        directory = tmp_path / "visual"
        directory.mkdir()
        tensors = {}
        for file in sorted(full.glob("*.safetensors")):
            tensors.update({name.removeprefix("model."): t for name, t in load_file(file).items()})
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(full / "config.json", directory / "config.json")
    model = load_model(directory)
    assert model.model_type == model_type and isinstance(model, Glm4vVisionTower)
    check(model, tower, CASES["images-and-videos"])


def test_a_glm4v_moe_config_loads_the_same_tower(tmp_path):
    """GLM-4.5V's config (glm4v_moe) carries GLM-4.1V's vision config: only config.json differs."""
    tower = hf_tower("hd16-pos8x8", seed=6)
    save_full(tower, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "glm4v_moe"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path)
    assert model.model_type == "glm4v_moe"
    check(model, tower, CASES["several-images"])


# name: (depth, hidden, heads, block MLP width = out_hidden, merger width) from vision-towers.md §2
RELEASED = {
    "glm-4.1v-9b": (24, 1536, 12, 4096, 13696),
    "glm-4.6v-flash": (24, 1536, 12, 4096, 13696),
    "glm-4.5v": (24, 1536, 12, 4096, 10944),
    "glm-4.6v": (24, 1536, 12, 4096, 10944),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_have_the_released_shapes_and_hf_parameter_names(name):
    config = preset_config("random:" + name)
    assert (config.depth, config.hidden_size, config.num_heads, config.out_hidden_size,
            config.intermediate_size) == RELEASED[name]
    assert (config.head_dim, config.patch_size, config.position_grid_side, config.attention_bias) == (128, 14, 24, False)
    settings = {k: v for k, v in config.to_dict().items() if k != "rope_theta"}
    with torch.device("meta"):
        ours = Glm4vVisionTower(config)
        theirs = transformers.Glm4vVisionModel(transformers.Glm4vVisionConfig(**settings))
    assert {n: t.shape for n, t in ours.state_dict().items()} == {n: t.shape for n, t in theirs.state_dict().items()}


def test_the_tiny_preset_says_its_family_and_preprocessing():
    model = load_model("random:tiny-glm")
    assert isinstance(model, Glm4vVisionTower) and model.model_type == "glm4v"
    assert (model.preprocess.patch_size, model.preprocess.image_resize_as_clip) == (14, True)


def test_serve_gives_the_eager_models_results(tmp_path):
    tower = hf_tower("hd24-pos24x24", seed=2)
    checkpoint = tmp_path / "glm-tiny"
    save_full(tower, checkpoint)
    model = load_model(checkpoint)
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8),
             rng.integers(0, 256, (20, 300, 3), dtype=np.uint8)]
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", str(checkpoint), "--min-budget", "64", "--max-budget", "512"):
        with Client(endpoint) as client, client.encode(items) as result:
            assert (client.model.model_type, client.model.num_deepstack) == ("glm4v", 0)
            for item, served_item in zip(items, result.items):
                expected = eager(model, item)
                torch.testing.assert_close(served_item.embeddings, expected, atol=1e-5, rtol=1e-5)
                assert served_item.packed.shape == expected.shape


def test_generate_of_a_glm4v_model_takes_its_features_from_vitserve(tmp_path):
    """The transformers integration with GLM-4.1V: an unchanged generate() gives the tokens of the
    model's own tower, images and videos alike; verify says the tower is its own."""
    from vitserve.engine import EngineConfig
    from vitserve.integrations.transformers import attach, detach, verify
    from vitserve.preprocess.config import released_preprocess
    from vitserve.workers import WindowConfig

    image_token, start, end = 150, 152, 153
    vision = {**TOWERS["hd16-pos8x8"], "out_hidden_size": 32}  # (rows go into the text stream)
    text = {**TEXT, "num_hidden_layers": 2, "vocab_size": 160,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    config = transformers.Glm4vConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                                      video_token_id=151, image_start_token_id=start, image_end_token_id=end,
                                      video_start_token_id=154, video_end_token_id=155)
    torch.manual_seed(4)
    model = transformers.Glm4vForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "vlm")
    rng = np.random.default_rng(1)
    image = preprocess_image(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), released_preprocess("glm4v"))
    video = preprocess_video(rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8), released_preprocess("glm4v"))
    t, h, w = image.grid_thw[0].tolist()
    vt, vh, vw = video.grid_thw[0].tolist()
    # GLM's prompt: a video's frames are image tokens inside the video span, one run per temporal patch
    # (its model finds both by the image token: one kind of item per prompt)
    video_ids = [154] + [tok for _ in range(vt) for tok in [start] + [image_token] * (vh * vw // 4) + [end]] + [155]
    prompts = [([1, 5, start] + [image_token] * (t * h * w // 4) + [end, 17, 2],
                {"pixel_values": image.pixel_values, "image_grid_thw": image.grid_thw}),
               ([1, 5] + video_ids + [17, 2],
                {"pixel_values_videos": video.pixel_values, "video_grid_thw": video.grid_thw})]

    own = greedy_tokens(model, prompts)
    attach(model, EngineConfig(model=str(tmp_path / "vlm"), window=WindowConfig(min_budget=64, max_budget=512)))
    try:
        assert greedy_tokens(model, prompts) == own
        verdict = verify(model)
        assert verdict.ok and "fingerprint equal" in str(verdict), verdict.message
    finally:
        detach(model)


def test_the_runner_packs_glm_windows_equal_to_per_item_encodes():
    """Budget windows (the path a CUDA graph replays, eager on the CPU over static buffers) of mixed
    images and videos, several per window, and items too large for any budget."""
    from runner_helpers import assert_equals_per_item, assert_items_tile_the_output, random_pixels

    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model("random:tiny-glm")
    runner = ModelRunner(model, WindowConfig(budgets=(64, 128, 256), max_items=4, max_sequences=6))
    grids = [(1, 4, 6), (2, 6, 4), (1, 2, 2), (3, 4, 4), (1, 16, 18), (1, 10, 2), (2, 2, 8)]
    pixels = random_pixels(model, grids, seed=7)
    result = runner.encode(pixels, grids)
    assert result.output.shape == (pixels.shape[0] // 4, 1, 128)
    assert runner.stats.summary()["windows"] >= 2 and runner.stats.summary()["eager_runs"]["too_many_tokens"] == 1
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)
