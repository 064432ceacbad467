"""`load_model`: checkpoint directories written by Hugging Face, `random:` presets, and every
way a checkpoint or a vision config can be wrong (each with the message a user would read).

Checkpoints are built here with transformers' own classes (tiny configs, no downloads).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers
from vitserve.models import PRESETS, CheckpointError, Qwen3VLVisionConfig, Qwen3VLVisionTower, load_model
from vitserve.models.presets import preset_config

INDEX = "model.safetensors.index.json"

TINY_VISION = dict(
    depth=2, hidden_size=48, intermediate_size=64, num_heads=4, out_hidden_size=32,
    num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16,
)
# mrope_section sums to head_dim // 2 = 8.
TINY_TEXT = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, vocab_size=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                     "mrope_interleaved": True},
)


# -- checkpoints written by Hugging Face ----------------------------------------------------


@torch.no_grad()
def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves norms at 1/0 and biases at 0: move them so weight comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _hf_tower(seed: int = 0) -> transformers.Qwen3VLVisionModel:
    torch.manual_seed(seed)
    tower = transformers.Qwen3VLVisionModel(transformers.Qwen3VLVisionConfig(**TINY_VISION)).eval()
    _perturb_(tower, seed)
    return tower


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """`Qwen3VLVisionModel.save_pretrained`: one model.safetensors, tensor names without a prefix."""
    tower = _hf_tower(seed=1)
    directory = tmp_path_factory.mktemp("bare")
    tower.save_pretrained(directory)
    return directory, _state(tower)


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A whole tiny Qwen3-VL, saved in 50 KB shards with an index; vision weights under `model.visual.`."""
    config = transformers.Qwen3VLConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)
    torch.manual_seed(2)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    _perturb_(model.model.visual, seed=2)
    directory = tmp_path_factory.mktemp("full")
    model.save_pretrained(directory, max_shard_size="50KB")
    return directory, _state(model.model.visual)


@pytest.fixture(scope="module")
def visual_prefix_checkpoint(tmp_path_factory, full_checkpoint) -> tuple[Path, dict[str, torch.Tensor]]:
    """The full checkpoint rewritten with the older layout: `visual.*` and `language_model.*`, one file."""
    source, vision_state = full_checkpoint
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            tensors[name.removeprefix("model.")] = tensor
    assert any(n.startswith("visual.") for n in tensors) and any(n.startswith("language_model.") for n in tensors)
    directory = tmp_path_factory.mktemp("visual_prefix")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", directory / "config.json")
    return directory, vision_state


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(directory, target)
    return target


def _assert_same_weights(model: Qwen3VLVisionTower, reference: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for name, expected in reference.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], expected.to(dtype)), name


def _weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX).read_text())["weight_map"]


def _write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


# -- what Hugging Face writes ----------------------------------------------------------------


def test_hf_writes_the_layouts_we_load(bare_checkpoint, full_checkpoint):
    """Guards the fixtures' assumptions (and the loader's) against a transformers upgrade."""
    bare, _ = bare_checkpoint
    with safe_open(bare / "model.safetensors", framework="pt") as handle:
        assert "pos_embed.weight" in handle.keys()
    assert json.loads((bare / "config.json").read_text())["model_type"] == "qwen3_vl_vision"

    full, _ = full_checkpoint
    names = _weight_map(full)
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
    _assert_same_weights(model, reference)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.attention_backend == "sdpa"
    assert model.config.depth == 2 and model.config.out_hidden_size == 32
    assert model.config.deepstack_visual_indexes == (0,)


def test_load_bare_tower_from_str_path(bare_checkpoint):
    directory, reference = bare_checkpoint
    _assert_same_weights(load_model(str(directory)), reference)


def test_load_sharded_full_vlm_ignores_language_model(full_checkpoint):
    directory, reference = full_checkpoint
    _assert_same_weights(load_model(directory), reference)


def test_load_full_vlm_reads_only_shards_with_vision_tensors(full_checkpoint, tmp_path):
    """Shards holding only language-model tensors are never opened: garbage there does not matter."""
    directory = _copy(full_checkpoint[0], tmp_path)
    shards: dict[str, list[str]] = {}
    for name, file in _weight_map(directory).items():
        shards.setdefault(file, []).append(name)
    text_only = [f for f, names in shards.items() if not any(n.startswith("model.visual.") for n in names)]
    assert text_only, "the fixture should have at least one shard without vision tensors"
    for file in text_only:
        (directory / file).write_bytes(b"not a safetensors file")
    _assert_same_weights(load_model(directory), full_checkpoint[1])


def test_load_visual_prefix(visual_prefix_checkpoint):
    directory, reference = visual_prefix_checkpoint
    _assert_same_weights(load_model(directory), reference)


def test_load_with_dtype_bfloat16(full_checkpoint):
    directory, reference = full_checkpoint
    model = load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_same_weights(model, reference, dtype=torch.bfloat16)
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
        _write_config(target, {"model_type": "qwen3_vl", "vision_config": vision_config})
        _assert_same_weights(load_model(target), reference)


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
    assert isinstance(config, Qwen3VLVisionConfig)


RELEASED = {
    # name: (depth, hidden, intermediate, heads, out_hidden, deepstack)
    "qwen3-vl-2b": (24, 1024, 4096, 16, 2048, (5, 11, 17)),
    "qwen3-vl-4b": (24, 1024, 4096, 16, 2560, (5, 11, 17)),
    "qwen3-vl-8b": (27, 1152, 4304, 16, 4096, (8, 16, 24)),
    "qwen3-vl-32b": (27, 1152, 4304, 16, 5120, (8, 16, 24)),
    "qwen3-vl-30b-a3b": (27, 1152, 4304, 16, 2048, (8, 16, 24)),
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


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-8b"])
def test_preset_parameters_match_hf_tower(name):
    """A preset's parameter names and shapes are those of HF's tower with the same config (on meta: no memory)."""
    config = preset_config("random:" + name)
    hf_config = transformers.Qwen3VLVisionConfig(
        **{k: v for k, v in config.to_dict().items() if k != "rope_theta"},
    )
    with torch.device("meta"):
        ours = Qwen3VLVisionTower(config)
        theirs = transformers.Qwen3VLVisionModel(hf_config)
    ours_shapes = {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    theirs_shapes = {n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


# -- where the source is not a loadable checkpoint -------------------------------------------------


def test_unknown_preset_lists_available(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model preset 'random:nope'; available presets: ") as info:
        load_model("random:nope")
    for name in PRESETS:
        assert f"random:{name}" in str(info.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(CheckpointError, match=r"neither a checkpoint directory nor a preset.*random:tiny") as info:
        load_model(missing)
    assert str(missing) in str(info.value)


def test_path_to_a_file_is_not_a_checkpoint(bare_checkpoint):
    file = bare_checkpoint[0] / "model.safetensors"
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        load_model(file)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_directory_without_config(tmp_path, bare_checkpoint):
    shutil.copy(bare_checkpoint[0] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"has no config\.json: expected a Hugging Face checkpoint directory"):
        load_model(tmp_path)


def test_config_of_another_model_type(tmp_path, bare_checkpoint):
    shutil.copy(bare_checkpoint[0] / "model.safetensors", tmp_path / "model.safetensors")
    _write_config(tmp_path, {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2})
    with pytest.raises(CheckpointError, match=r"model_type 'llama' and no Qwen3-VL vision_config"):
        load_model(tmp_path)


def test_other_vlm_with_a_vision_config(tmp_path):
    _write_config(tmp_path, {"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}})
    with pytest.raises(CheckpointError, match=r"model_type 'qwen2_5_vl'.*vitserve loads Qwen3-VL vision towers"):
        load_model(tmp_path)


def test_config_without_model_type(tmp_path):
    _write_config(tmp_path, {"hidden_size": 48})
    with pytest.raises(CheckpointError, match=r"model_type None and no Qwen3-VL vision_config"):
        load_model(tmp_path)


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_vl", ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_model(tmp_path)


def test_config_without_safetensors(tmp_path, bare_checkpoint):
    shutil.copy(bare_checkpoint[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"has no \*\.safetensors files \(nor model\.safetensors\.index\.json\)"):
        load_model(tmp_path)


def test_index_without_weight_map(tmp_path, full_checkpoint):
    directory = _copy(full_checkpoint[0], tmp_path)
    (directory / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"is not a safetensors index with a weight_map"):
        load_model(directory)


def test_no_vision_tensors(tmp_path, full_checkpoint):
    directory = _copy(full_checkpoint[0], tmp_path)
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.startswith("model.visual.")}
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"has no vision tensors under model\.visual\. or visual\."):
        load_model(directory)


# -- tensors that do not fit the config ------------------------------------------------------------


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_vision_tensor_bare(tmp_path, bare_checkpoint):
    directory = _copy(bare_checkpoint[0], tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.pop("blocks.1.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 vision tensor\(s\) the config needs: blocks\.1\.attn\.qkv\.bias$"):
        load_model(directory)


def test_missing_vision_tensor_sharded(tmp_path, full_checkpoint):
    """Removed from the shard and from the index: the message names it with its prefix."""
    directory = _copy(full_checkpoint[0], tmp_path)
    name = "model.visual.merger.norm.weight"
    index = json.loads((directory / INDEX).read_text())
    file = index["weight_map"].pop(name)
    (directory / INDEX).write_text(json.dumps(index))
    _rewrite(directory / file, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"lacks 1 vision tensor\(s\) the config needs: {re.escape(name)}"):
        load_model(directory)


def test_missing_vision_tensors_config_deeper_than_checkpoint(tmp_path, bare_checkpoint):
    """A config that claims more blocks than the checkpoint has: the first missing names are listed."""
    directory = _copy(bare_checkpoint[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    _write_config(directory, {**config, "depth": 3})
    with pytest.raises(CheckpointError, match=r"lacks 12 vision tensor\(s\) the config needs: blocks\.2\.attn\.proj\.bias"):
        load_model(directory)


def test_extra_vision_tensor_bare(tmp_path, bare_checkpoint):
    directory = _copy(bare_checkpoint[0], tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.update({"blocks.2.norm1.weight": torch.ones(48)}))
    with pytest.raises(
        CheckpointError,
        match=r"has 1 vision tensor\(s\) the config does not use: blocks\.2\.norm1\.weight \(in model\.safetensors\)",
    ):
        load_model(directory)


def test_extra_vision_tensor_sharded(tmp_path, full_checkpoint):
    directory = _copy(full_checkpoint[0], tmp_path)
    index = json.loads((directory / INDEX).read_text())
    name, file = "model.visual.deepstack_merger_list.1.norm.weight", index["weight_map"]["model.visual.pos_embed.weight"]
    index["weight_map"][name] = file
    (directory / INDEX).write_text(json.dumps(index))
    _rewrite(directory / file, lambda t: t.update({name: torch.ones(192)}))
    with pytest.raises(
        CheckpointError,
        match=rf"has 1 vision tensor\(s\) the config does not use: {re.escape(name)} \(in {re.escape(file)}\)",
    ):
        load_model(directory)


def test_shape_mismatch_bare(tmp_path, bare_checkpoint):
    directory = _copy(bare_checkpoint[0], tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.update({"merger.linear_fc2.weight": torch.zeros(33, 192)}))
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "tensor merger.linear_fc2.weight in model.safetensors has shape [33, 192], but the config needs [32, 192]"
        ),
    ):
        load_model(directory)


def test_shape_mismatch_sharded(tmp_path, full_checkpoint):
    """A config whose position grid differs from the checkpoint's: pos_embed is named with its shard."""
    directory = _copy(full_checkpoint[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["num_position_embeddings"] = 144
    _write_config(directory, config)
    file = _weight_map(directory)["model.visual.pos_embed.weight"]
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"tensor model.visual.pos_embed.weight in {file} has shape [64, 48], but the config needs [144, 48]"
        ),
    ):
        load_model(directory)


def test_index_names_a_missing_shard(tmp_path, full_checkpoint):
    directory = _copy(full_checkpoint[0], tmp_path)
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"]["model.visual.pos_embed.weight"] = "model-00042-of-00042.safetensors"
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json names model-00042-of-00042\.safetensors, which does not exist"
    ):
        load_model(directory)


def test_deleted_shard(tmp_path, full_checkpoint):
    directory = _copy(full_checkpoint[0], tmp_path)
    file = _weight_map(directory)["model.visual.patch_embed.proj.weight"]
    (directory / file).unlink()
    with pytest.raises(CheckpointError, match=rf"names {re.escape(file)}, which does not exist"):
        load_model(directory)


# -- invalid vision configs ----------------------------------------------------------------------

INVALID_VISION = [
    pytest.param(dict(hidden_size=50), r"hidden_size 50 must be divisible by num_heads 4", id="hidden-not-divisible"),
    pytest.param(dict(hidden_size=40), r"head dim 10 \(hidden_size / num_heads\) must be a multiple of 4",
                 id="head-dim-not-multiple-of-4"),
    pytest.param(dict(num_position_embeddings=60), r"num_position_embeddings 60 must be a perfect square",
                 id="pos-not-square"),
    pytest.param(dict(deepstack_visual_indexes=[2]),
                 r"deepstack_visual_indexes \[2\] must be distinct block indexes in \[0, 2\)", id="deepstack-too-large"),
    pytest.param(dict(deepstack_visual_indexes=[-1]),
                 r"deepstack_visual_indexes \[-1\] must be distinct block indexes in \[0, 2\)", id="deepstack-negative"),
    pytest.param(dict(deepstack_visual_indexes=[1, 1]),
                 r"deepstack_visual_indexes \[1, 1\] must be distinct", id="deepstack-repeated"),
    pytest.param(dict(hidden_act="gelu"),
                 r"hidden_act 'gelu' is not supported; expected one of \['gelu_pytorch_tanh'\]", id="hidden-act"),
    pytest.param(dict(depth=0), r"depth must be a positive integer, got 0", id="depth-zero"),
    pytest.param(dict(num_heads=2.5), r"num_heads must be a positive integer, got 2\.5", id="heads-float"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID_VISION)
def test_invalid_vision_config(overrides, message):
    fields = {k: v for k, v in TINY_VISION.items()}
    fields.update(overrides)
    with pytest.raises(ValueError, match=r"^vision config: " + message):
        Qwen3VLVisionConfig(**fields)


@pytest.mark.parametrize(("overrides", "message"), INVALID_VISION)
def test_invalid_vision_config_in_bare_checkpoint(overrides, message, tmp_path, bare_checkpoint):
    config = json.loads((bare_checkpoint[0] / "config.json").read_text())
    _write_config(tmp_path, {**config, **overrides})
    path = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{path}: vision config: {message}"):
        load_model(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), INVALID_VISION)
def test_invalid_vision_config_in_full_checkpoint(overrides, message, tmp_path, full_checkpoint):
    config = json.loads((full_checkpoint[0] / "config.json").read_text())
    config["vision_config"].update(overrides)
    _write_config(tmp_path, config)
    path = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{path}: vision config: {message}"):
        load_model(tmp_path)


def test_unsupported_rope_type_in_checkpoint(tmp_path, bare_checkpoint):
    config = json.loads((bare_checkpoint[0] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    _write_config(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"rope_type 'default' is not supported \(expected 'axial'\)"):
        load_model(tmp_path)


def test_vision_config_from_hf_spellings():
    """5.x writes num_heads/depth and rope_parameters; 4.57 wrote num_attention_heads style keys too."""
    new = Qwen3VLVisionConfig.from_hf({**TINY_VISION, "rope_parameters": {"rope_type": "axial", "rope_theta": 500.0}})
    old = Qwen3VLVisionConfig.from_hf(
        {**{k: v for k, v in TINY_VISION.items() if k not in ("num_heads", "depth")},
         "num_attention_heads": 4, "num_hidden_layers": 2, "rope_theta": 500.0, "initializer_range": 0.02}
    )
    assert new == old
    assert new.num_heads == 4 and new.depth == 2 and new.rope_theta == 500.0
    assert new.deepstack_visual_indexes == (0,)
    assert new.head_dim == 12 and new.position_grid_side == 8
    assert math.isqrt(new.num_position_embeddings) == new.position_grid_side
