"""`load_model`: every way a checkpoint or a vision config can be wrong, each with the message a user
would read."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitserve.models import PRESETS, CheckpointError, Qwen3VLVisionConfig, load_model

from hf_checkpoints import (  # noqa: F401 (fixtures are used by name)
    INDEX,
    TINY_VISION,
    bare_checkpoint,
    full_checkpoint,
    copy_checkpoint,
    read_weight_map,
    write_config,
)


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
    write_config(tmp_path, {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2})
    with pytest.raises(CheckpointError, match=r"model_type 'llama' and no vision_config of a tower vitserve runs"):
        load_model(tmp_path)


def test_other_vlm_with_a_vision_config(tmp_path):
    write_config(tmp_path, {"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}})
    with pytest.raises(CheckpointError, match=r"model_type 'qwen2_5_vl'.*vitserve loads these vision towers: Qwen3-VL and Qwen3.5.*GLM-4.1V"):
        load_model(tmp_path)


def test_config_without_model_type(tmp_path):
    write_config(tmp_path, {"hidden_size": 48})
    with pytest.raises(CheckpointError, match=r"model_type None and no vision_config of a tower vitserve runs"):
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
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    (directory / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"is not a safetensors index with a weight_map"):
        load_model(directory)


def test_no_vision_tensors(tmp_path, full_checkpoint):
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
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
    directory = copy_checkpoint(bare_checkpoint[0], tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.pop("blocks.1.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 vision tensor\(s\) the config needs: blocks\.1\.attn\.qkv\.bias$"):
        load_model(directory)


def test_missing_vision_tensor_sharded(tmp_path, full_checkpoint):
    """Removed from the shard and from the index: the message names it with its prefix."""
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    name = "model.visual.merger.norm.weight"
    index = json.loads((directory / INDEX).read_text())
    file = index["weight_map"].pop(name)
    (directory / INDEX).write_text(json.dumps(index))
    _rewrite(directory / file, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"lacks 1 vision tensor\(s\) the config needs: {re.escape(name)}"):
        load_model(directory)


def test_missing_vision_tensors_config_deeper_than_checkpoint(tmp_path, bare_checkpoint):
    """A config that claims more blocks than the checkpoint has: the first missing names are listed."""
    directory = copy_checkpoint(bare_checkpoint[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    write_config(directory, {**config, "depth": 3})
    with pytest.raises(CheckpointError, match=r"lacks 12 vision tensor\(s\) the config needs: blocks\.2\.attn\.proj\.bias"):
        load_model(directory)


def test_extra_vision_tensor_bare(tmp_path, bare_checkpoint):
    directory = copy_checkpoint(bare_checkpoint[0], tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.update({"blocks.2.norm1.weight": torch.ones(48)}))
    with pytest.raises(
        CheckpointError,
        match=r"has 1 vision tensor\(s\) the config does not use: blocks\.2\.norm1\.weight \(in model\.safetensors\)",
    ):
        load_model(directory)


def test_extra_vision_tensor_sharded(tmp_path, full_checkpoint):
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
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
    directory = copy_checkpoint(bare_checkpoint[0], tmp_path)
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
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["num_position_embeddings"] = 144
    write_config(directory, config)
    file = read_weight_map(directory)["model.visual.pos_embed.weight"]
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"tensor model.visual.pos_embed.weight in {file} has shape [64, 48], but the config needs [144, 48]"
        ),
    ):
        load_model(directory)


def test_index_names_a_missing_shard(tmp_path, full_checkpoint):
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"]["model.visual.pos_embed.weight"] = "model-00042-of-00042.safetensors"
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json names model-00042-of-00042\.safetensors, which does not exist"
    ):
        load_model(directory)


def test_deleted_shard(tmp_path, full_checkpoint):
    directory = copy_checkpoint(full_checkpoint[0], tmp_path)
    file = read_weight_map(directory)["model.visual.patch_embed.proj.weight"]
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
    write_config(tmp_path, {**config, **overrides})
    path = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{path}: vision config: {message}"):
        load_model(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), INVALID_VISION)
def test_invalid_vision_config_in_full_checkpoint(overrides, message, tmp_path, full_checkpoint):
    config = json.loads((full_checkpoint[0] / "config.json").read_text())
    config["vision_config"].update(overrides)
    write_config(tmp_path, config)
    path = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{path}: vision config: {message}"):
        load_model(tmp_path)


def test_unsupported_rope_type_in_checkpoint(tmp_path, bare_checkpoint):
    config = json.loads((bare_checkpoint[0] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    write_config(tmp_path, config)
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
