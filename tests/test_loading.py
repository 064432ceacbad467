"""`load_model`: checkpoint directories written by Hugging Face and `random:` presets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers
from vitserve.models import PRESETS, Qwen3VLVisionConfig, Qwen3VLVisionTower, load_model
from vitserve.models.glm4v.config import Glm4vVisionConfig
from vitserve.models.kimi_k25.config import KimiK25VisionConfig
from vitserve.models.presets import preset_config

from hf_checkpoints import (  # noqa: F401 (fixtures are used by name)
    bare_checkpoint,
    full_checkpoint,
    visual_prefix_checkpoint,
    copy_checkpoint,
    assert_same_weights,
    read_weight_map,
    write_config,
)


# -- what Hugging Face writes ----------------------------------------------------------------


def test_hf_writes_the_layouts_we_load(bare_checkpoint, full_checkpoint):
    """Guards the fixtures' assumptions (and the loader's) against a transformers upgrade."""
    bare, _ = bare_checkpoint
    with safe_open(bare / "model.safetensors", framework="pt") as handle:
        assert "pos_embed.weight" in handle.keys()
    assert json.loads((bare / "config.json").read_text())["model_type"] == "qwen3_vl_vision"

    full, _ = full_checkpoint
    names = read_weight_map(full)
    assert len(set(names.values())) > 1, "expected a sharded checkpoint"
    assert "model.visual.pos_embed.weight" in names
    assert any(n.startswith("model.language_model.") for n in names)
    config = json.loads((full / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and "vision_config" in config


# -- successful loads ----------------------------------------------------------------------------


def test_load_bare_tower(bare_checkpoint):
    directory, reference = bare_checkpoint
    model = load_model(directory)
    assert isinstance(model, Qwen3VLVisionTower)
    assert_same_weights(model, reference)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.attention_backend == "sdpa"
    assert model.config.depth == 2 and model.config.out_hidden_size == 32
    assert model.config.deepstack_visual_indexes == (0,)


def test_load_bare_tower_from_str_path(bare_checkpoint):
    directory, reference = bare_checkpoint
    assert_same_weights(load_model(str(directory)), reference)


def test_load_sharded_full_vlm_ignores_language_model(full_checkpoint):
    directory, reference = full_checkpoint
    assert_same_weights(load_model(directory), reference)


def test_load_full_vlm_reads_only_shards_with_vision_tensors(full_checkpoint, tmp_path):
    """Shards holding only language-model tensors are never opened: garbage there does not matter."""
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    shards: dict[str, list[str]] = {}
    for name, file in read_weight_map(directory).items():
        shards.setdefault(file, []).append(name)
    text_only = [f for f, names in shards.items() if not any(n.startswith("model.visual.") for n in names)]
    assert text_only, "the fixture should have at least one shard without vision tensors"
    for file in text_only:
        (directory / file).write_bytes(b"not a safetensors file")
    assert_same_weights(load_model(directory), full_checkpoint[1])


def test_load_visual_prefix(visual_prefix_checkpoint):
    directory, reference = visual_prefix_checkpoint
    assert_same_weights(load_model(directory), reference)


def test_load_with_dtype_bfloat16(full_checkpoint):
    directory, reference = full_checkpoint
    model = load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_weights(model, reference, dtype=torch.bfloat16)
    assert model.attention_backend == "sdpa"


def test_all_layouts_load_the_same_model(bare_checkpoint, tmp_path):
    """The bare tower's tensors, rewritten under each prefix with a full-VLM config, load identically."""
    directory, reference = bare_checkpoint
    vision_config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    for prefix in ("model.visual.", "visual."):
        target = tmp_path / prefix.strip(".")
        target.mkdir()
        save_file({prefix + n: t for n, t in tensors.items()}, target / "model.safetensors", metadata={"format": "pt"})
        write_config(target, {"model_type": "qwen3_vl", "vision_config": vision_config})
        assert_same_weights(load_model(target), reference)


# -- presets ---------------------------------------------------------------------------------------

def _tiny_inputs(model: Qwen3VLVisionTower, grids, seed: int = 0) -> torch.Tensor:
    tokens = sum(t * h * w for t, h, w in grids)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, model.geometry.patch_dim, generator=generator)


def test_random_tiny_is_seeded():
    first, second = load_model("random:tiny"), load_model("random:tiny")
    a, b = first.state_dict(), second.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Norms are perturbed away from 1/0 so tests exercise them.
    assert not torch.equal(a["blocks.0.norm1.weight"], torch.ones_like(a["blocks.0.norm1.weight"]))


def test_random_tiny_same_weights_in_every_dtype():
    fp32 = load_model("random:tiny").state_dict()
    bf16 = load_model("random:tiny", dtype=torch.bfloat16).state_dict()
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name


def test_random_tiny_encode_patches_shapes():
    model = load_model("random:tiny")
    config = model.config
    grids = [(1, 4, 4), (2, 2, 6), (1, 8, 2)]
    tokens = sum(t * h * w for t, h, w in grids)
    pixel_values = _tiny_inputs(model, grids)
    assert pixel_values.shape[1] == config.in_channels * config.temporal_patch_size * config.patch_size**2
    out = model.encode_patches(pixel_values, torch.tensor(grids))
    merged = tokens // config.spatial_merge_size**2
    assert out.embeddings.shape == (merged, config.out_hidden_size)
    assert out.deepstack.shape == (len(config.deepstack_visual_indexes), merged, config.out_hidden_size)
    assert out.embeddings.dtype == out.deepstack.dtype == torch.float32
    assert torch.isfinite(out.embeddings).all() and torch.isfinite(out.deepstack).all()
    # Deterministic, and the same with grid_thw as a list.
    again = model.encode_patches(pixel_values, grids)
    assert torch.equal(out.embeddings, again.embeddings) and torch.equal(out.deepstack, again.deepstack)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    config = preset_config("random:" + name)
    assert config is PRESETS[name]
    family = {"glm": Glm4vVisionConfig, "tiny-glm": Glm4vVisionConfig, "kimi": KimiK25VisionConfig,
              "tiny-kimi": KimiK25VisionConfig}
    assert isinstance(config, next((c for p, c in family.items() if name.startswith(p)), Qwen3VLVisionConfig))


RELEASED = {
    # name: (depth, hidden, intermediate, heads, out_hidden, deepstack)
    "qwen3-vl-2b": (24, 1024, 4096, 16, 2048, (5, 11, 17)),
    "qwen3-vl-4b": (24, 1024, 4096, 16, 2560, (5, 11, 17)),
    "qwen3-vl-8b": (27, 1152, 4304, 16, 4096, (8, 16, 24)),
    "qwen3-vl-32b": (27, 1152, 4304, 16, 5120, (8, 16, 24)),
    "qwen3-vl-30b-a3b": (27, 1152, 4304, 16, 2048, (8, 16, 24)),
    # Qwen3.5 (vision-towers.md, the released configs; no deepstack)
    "qwen3.5-0.8b": (12, 768, 3072, 12, 1024, ()),
    "qwen3.5-2b": (24, 1024, 4096, 16, 2048, ()),
    "qwen3.5-4b": (24, 1024, 4096, 16, 2560, ()),
    "qwen3.5-9b": (27, 1152, 4304, 16, 4096, ()),
    "qwen3.5-27b": (27, 1152, 4304, 16, 5120, ()),
    "qwen3.5-35b-a3b": (27, 1152, 4304, 16, 2048, ()),
    "qwen3.5-122b-a10b": (27, 1152, 4304, 16, 3072, ()),
    "qwen3.5-397b-a17b": (27, 1152, 4304, 16, 4096, ()),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_matches_released_config(name):
    config = preset_config("random:" + name)
    depth, hidden, intermediate, heads, out_hidden, deepstack = RELEASED[name]
    assert (config.depth, config.hidden_size, config.intermediate_size, config.num_heads) == (
        depth, hidden, intermediate, heads,
    )
    assert config.out_hidden_size == out_hidden
    assert config.deepstack_visual_indexes == deepstack
    # Shared by every released Qwen3-VL tower.
    assert (config.patch_size, config.temporal_patch_size, config.spatial_merge_size, config.in_channels) == (16, 2, 2, 3)
    assert config.num_position_embeddings == 2304
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert config.rope_theta == 10000.0


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-8b", "qwen3.5-0.8b", "qwen3.5-9b"])
def test_preset_parameters_match_hf_tower(name):
    """A preset's parameter names and shapes are those of HF's tower of its family with the same config
    (on meta: no memory)."""
    config = preset_config("random:" + name)
    settings = {k: v for k, v in config.to_dict().items() if k != "rope_theta"}
    if name.startswith("qwen3.5"):  # Qwen3.5's tower has no deepstack and no setting for it
        assert settings.pop("deepstack_visual_indexes") == []
        hf_config, hf_tower = transformers.Qwen3_5VisionConfig(**settings), transformers.Qwen3_5VisionModel
    else:
        hf_config, hf_tower = transformers.Qwen3VLVisionConfig(**settings), transformers.Qwen3VLVisionModel
    with torch.device("meta"):
        ours = Qwen3VLVisionTower(config)
        theirs = hf_tower(hf_config)
    ours_shapes = {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    theirs_shapes = {n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
