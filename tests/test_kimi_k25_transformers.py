"""Kimi K2.5's vision tower with its projector, checked against Hugging Face transformers' model:
checkpoints transformers saves load (sharded, the vision tower and projector picked out of the whole
model) and give HF's image features (tower, then mm_projector) in float32 for images, non-square
grids, packed items, videos of 1 to 9 frames (chunks of up to 4 frames) and mixes. The presets have
the released shapes and the config is read from the whole model's config. The bench's transformers
baseline is the same tower, `vitserve serve` of such a checkpoint gives the eager model's results,
generate() through the transformers integration takes its features from vitserve, and the names
transformers holds map back to the files. The tower on its own (runner windows, calibration, leases)
is tested in test_kimi_k25.py."""

from __future__ import annotations

import json

import pytest
import torch

import transformers
from hf_reference import greedy_tokens, perturb_
from test_kimi_k25 import PATCH_DIM
from test_model_parity import TOLERANCE, assert_rows_match, eager, relative_error

from vitserve.models import load_model
from vitserve.models.kimi_k25.config import KimiK25VisionConfig
from vitserve.models.kimi_k25.model import KimiK25VisionTower
from vitserve.models.presets import preset_config

# Small towers that vary depth, head dims (16, 24, 36) and position tables (8x8: grids past it; 64x64
# as released: grids inside it and equal to it).
TOWERS = {
    "hd16-pos8": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                      pos_emb_height=8, pos_emb_width=8),
    "hd24-pos64": dict(num_hidden_layers=1, hidden_size=96, num_attention_heads=4, intermediate_size=64,
                       pos_emb_height=64, pos_emb_width=64),
    "hd36-pos16": dict(num_hidden_layers=3, hidden_size=72, num_attention_heads=2, intermediate_size=80,
                       pos_emb_height=16, pos_emb_width=16),
}
TEXT = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            vocab_size=128, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=1)
CASES = {
    "single-square": [(1, 8, 8)],
    "non-square": [(1, 6, 14)],
    "past-the-table": [(1, 18, 30)],
    "several-images": [(1, 4, 6), (1, 10, 4), (1, 2, 2)],
    "videos-1-to-9-frames": [(t, 4, 6) for t in range(1, 10)],
    "images-and-videos": [(1, 4, 6), (6, 6, 4), (1, 18, 30), (4, 2, 2), (5, 2, 4)],
}


def hf_model(name: str, seed: int = 0) -> transformers.Kimi_K25ForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.Kimi_K25Config(vision_config=TOWERS[name], text_config=TEXT,
                                         projection_hidden_size=TOWERS[name]["hidden_size"])
    model = transformers.Kimi_K25ForConditionalGeneration(config).eval()
    perturb_(model.model.vision_tower, seed)
    perturb_(model.model.mm_projector, seed + 1)
    return model


def chunks(t: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """HF's grid rows of one of our items: its processor cuts a video into chunks of 4 frames."""
    return [(min(4, t - start), h, w) for start in range(0, t, 4)]


def check(model, hf, grids, seed: int = 0) -> None:
    tokens = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(tokens, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    hf_grids = torch.tensor([c for grid in grids for c in chunks(*grid)])
    with torch.no_grad():
        expected = torch.cat(hf.model.get_image_features(pixel_values.view(-1, 3, 14, 14),
                                                         image_grid_thw=hf_grids).pooler_output)
    assert_rows_match(model, pixel_values, grids, expected)


@pytest.fixture(scope="module", params=sorted(TOWERS))
def pair(request, tmp_path_factory):
    hf = hf_model(request.param, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, max_shard_size="200KB")
    return load_model(directory), hf, directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_saved_model_matches_hf(pair, case):
    model, hf, _ = pair
    assert isinstance(model, KimiK25VisionTower) and model.model_type == "kimi_k25"
    assert model.geometry.patch_dim == PATCH_DIM and model.geometry.temporal_pool == 4
    check(model, hf, CASES[case])


def test_the_released_names_are_read_and_only_the_tower_and_projector(pair):
    """transformers writes the released layout (fused wqkv, blocks under encoder), some names under
    `model.`: exactly those of the tower and projector are ours; the language model is not read."""
    model, _, directory = pair
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    stored = {name.removeprefix("model.").replace("encoder.patch_embed.", "patch_embed.") for name in index}
    ours = {name for name in stored if name.startswith(("vision_tower.", "mm_projector."))}
    assert set(model.state_dict()) == ours and any(name.endswith(".wqkv.weight") for name in ours)
    assert any(name.startswith("language_model.") for name in stored)


@pytest.mark.parametrize("name", ["kimi-k2.5", "kimi-k2.6"])
def test_presets_have_the_released_shapes(name):
    config = preset_config("random:" + name)
    assert (config.depth, config.hidden_size, config.num_heads, config.intermediate_size, config.head_dim,
            config.pos_emb_height, config.out_hidden_size) == (27, 1152, 16, 4304, 72, 64, 7168)
    hf_config = transformers.Kimi_K25Config(vision_config={}, text_config={"hidden_size": 7168})
    with torch.device("meta"):
        ours = KimiK25VisionTower(config)
        theirs = transformers.Kimi_K25Model(hf_config)
    shapes = {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    assert shapes["vision_tower.encoder.blocks.26.wqkv.weight"] == (3 * 1152, 1152)
    assert shapes["vision_tower.patch_embed.pos_emb.weight"] == (64, 64, 1152)
    assert shapes["mm_projector.proj.2.weight"] == (7168, 4 * 1152)
    hf_count = sum(t.numel() for n, t in theirs.state_dict().items() if n.startswith(("vision_tower.", "mm_projector.")))
    assert sum(t.numel() for t in ours.state_dict().values()) == hf_count


def test_the_config_is_read_from_the_whole_models_config():
    whole = transformers.Kimi_K25Config(vision_config=TOWERS["hd16-pos8"], text_config=TEXT,
                                        projection_hidden_size=64).to_dict()
    config = KimiK25VisionConfig.from_hf(whole["vision_config"], whole)
    assert (config.depth, config.hidden_size, config.num_heads, config.pos_emb_height, config.out_hidden_size) == (
        2, 64, 4, 8, 48)
    with pytest.raises(ValueError, match="projection_hidden_size 32 must equal the vision hidden_size"):
        KimiK25VisionConfig.from_hf(whole["vision_config"], {**whole, "projection_hidden_size": 32})


def test_the_benchs_hugging_face_baseline_is_kimis_tower_and_projector(pair):
    """`vitserve bench` times transformers' Kimi tower and projector with our weights (names and the
    q/k layout mapped back) on the chunks its processor would give."""
    from vitserve.bench.runner_bench import hf_grid_thw, hf_twin

    model, _, _ = pair
    twin = hf_twin(model)
    grids = CASES["images-and-videos"]
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM)
    with torch.no_grad():
        reference = twin(pixel_values, grid_thw=hf_grid_thw(model, torch.tensor(grids)))
    assert relative_error(model.encode_patches(pixel_values, grids).embeddings, reference) <= TOLERANCE


def test_serve_gives_the_eager_models_results(pair, tmp_path):
    """Images and videos (5 frames: a chunk of 4 and one of 1) through `vitserve serve` on the CPU."""
    import numpy as np
    from served import served

    from vitserve import Client

    model, _, checkpoint = pair
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), rng.integers(0, 256, (5, 40, 60, 3), dtype=np.uint8),
             rng.integers(0, 256, (20, 300, 3), dtype=np.uint8)]
    endpoint = f"ipc://{tmp_path}/vitserve.sock"
    with served(endpoint, "--model", str(checkpoint), "--min-budget", "64", "--max-budget", "512",
                "--max-item-tokens", "4096"):
        with Client(endpoint) as client, client.encode(items) as result:
            assert (client.model.model_type, client.model.out_hidden) == ("kimi_k25", 48)
            for item, served_item in zip(items, result.items):
                torch.testing.assert_close(served_item.embeddings, eager(model, item), atol=1e-5, rtol=1e-5)
            t, h, w = result.items[1].grid
            assert t == 5 and result.items[1].embeddings.shape[0] == 2 * h * w // 4  # two chunks' rows


def test_generate_of_a_kimi_model_takes_its_features_from_vitserve(tmp_path):
    """The transformers integration with Kimi K2.5: an unchanged generate() gives the tokens of the model's
    own tower and projector, for an image and for a video of 6 frames (two chunks); verify agrees."""
    import numpy as np

    from vitserve.engine import EngineConfig
    from vitserve.integrations.transformers import attach, detach, verify
    from vitserve.preprocess import preprocess_image, preprocess_video
    from vitserve.preprocess.config import released_preprocess
    from vitserve.workers import WindowConfig

    image_token, video_token, start, end = 120, 121, 122, 123
    config = transformers.Kimi_K25Config(vision_config=TOWERS["hd16-pos8"], text_config=TEXT, projection_hidden_size=64,
                                         image_token_id=image_token, video_token_id=video_token,
                                         vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(4)
    model = transformers.Kimi_K25ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "vlm")
    rng = np.random.default_rng(1)
    preprocess = released_preprocess("kimi_k25")
    image = preprocess_image(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), preprocess)
    video = preprocess_video(rng.integers(0, 256, (6, 56, 84, 3), dtype=np.uint8), preprocess)
    t, h, w = image.grid_thw[0].tolist()
    vt, vh, vw = video.grid_thw[0].tolist()
    video_chunks = torch.tensor(chunks(vt, vh, vw))  # as Kimi's processor gives a video: one row per chunk
    prompts = [([1, 5, start] + [image_token] * (h * w // 4) + [end, 17, 2],
                {"pixel_values": image.pixel_values.view(-1, 3, 14, 14), "image_grid_thw": image.grid_thw}),
               ([1, 5, start] + [video_token] * (len(video_chunks) * vh * vw // 4) + [end, 17, 2],
                {"pixel_values_videos": video.pixel_values.view(-1, 3, 14, 14), "video_grid_thw": video_chunks})]

    own = greedy_tokens(model, prompts)
    attach(model, EngineConfig(model=str(tmp_path / "vlm"), window=WindowConfig(min_budget=64, max_budget=512),
                               max_item_tokens=4096))
    try:
        assert greedy_tokens(model, prompts) == own
        verdict = verify(model)
        assert verdict.ok and "fingerprint equal" in verdict.message, verdict.message
        with torch.no_grad():  # one weight of the projector, changed in memory
            model.model.mm_projector.out_proj.bias[0] += 1.0
        assert "fingerprint differs" in verify(model).message
    finally:
        detach(model)


def test_transformers_names_and_layout_go_back_to_the_files():
    """verify fingerprints a transformers model's Kimi weights as the files store them: the names
    transformers holds map back to the released ones, and q and k rows go back to their layout."""
    from vitserve.models.kimi_k25.hf_names import from_transformers, to_transformers
    from vitserve.models.kimi_k25.weights import to_interleaved, to_rotate_half

    tower = load_model("random:tiny-kimi")
    stored = {name: t.clone() for name, t in tower.state_dict().items()}
    config = tower.config
    held = to_transformers(to_rotate_half({n: t.clone() for n, t in stored.items()}, config))
    assert not set(held) & {n for n in stored if "wqkv" in n or "blocks" in n}  # renamed, split
    back = to_interleaved(from_transformers(held), config.num_heads, config.head_dim)
    assert set(back) == set(stored) and all(torch.equal(back[n], stored[n]) for n in stored)
