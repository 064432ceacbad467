"""Checkpoints written by Hugging Face for the loading tests (tiny configs, no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from hf_reference import perturb_
from vitserve.models import Qwen3VLVisionTower


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


def hf_tower(seed: int = 0) -> transformers.Qwen3VLVisionModel:
    torch.manual_seed(seed)
    tower = transformers.Qwen3VLVisionModel(transformers.Qwen3VLVisionConfig(**TINY_VISION)).eval()
    perturb_(tower, seed)
    return tower


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """`Qwen3VLVisionModel.save_pretrained`: one model.safetensors, tensor names without a prefix."""
    tower = hf_tower(seed=1)
    directory = tmp_path_factory.mktemp("bare")
    tower.save_pretrained(directory)
    return directory, state_of(tower)


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A whole tiny Qwen3-VL, saved in 50 KB shards with an index; vision weights under `model.visual.`."""
    config = transformers.Qwen3VLConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)
    torch.manual_seed(2)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    perturb_(model.model.visual, seed=2)
    directory = tmp_path_factory.mktemp("full")
    model.save_pretrained(directory, max_shard_size="50KB")
    return directory, state_of(model.model.visual)


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


def copy_checkpoint(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(directory, target)
    return target


def assert_same_weights(model: Qwen3VLVisionTower, reference: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for name, expected in reference.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], expected.to(dtype)), name


def read_weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX).read_text())["weight_map"]


def write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))
