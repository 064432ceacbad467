"""Our Qwen3-VL tower, loaded from checkpoints saved by Hugging Face, matches HF in float32."""

from __future__ import annotations

import json

import pytest
import torch

from hf_reference import TOWER_CONFIGS, build_tower, random_patches, reference_outputs, save_full_checkpoint
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image, preprocess_video

CASES = {
    "single-square": [(1, 8, 8)],
    "non-square": [(1, 6, 14)],
    "upsampled-grid": [(1, 18, 30)],
    "several-images": [(1, 4, 6), (1, 10, 4), (1, 2, 2)],
    "video": [(3, 6, 4)],
    "images-and-videos": [(1, 4, 6), (2, 6, 4), (1, 18, 30), (4, 2, 2)],
}
TOLERANCE = 1e-5  # max |ours - hf| / max |hf|


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_matches(model, tower, grids, seed=0):
    pixel_values, grid_thw = random_patches(grids, seed)
    merged, deepstack = reference_outputs(tower, pixel_values, grid_thw)
    out = model.encode_patches(pixel_values, grid_thw)
    assert out.embeddings.shape == merged.shape
    assert out.deepstack.shape == (len(deepstack), *merged.shape)
    assert relative_error(out.embeddings, merged) <= TOLERANCE
    for ours, reference in zip(out.deepstack, deepstack, strict=True):
        assert relative_error(ours, reference) <= TOLERANCE


def eager(model, item) -> torch.Tensor:
    """The eager model's embeddings of one uint8 image (H×W×3) or video (T×H×W×3), preprocessed as its
    checkpoint says."""
    patches = (preprocess_video if item.ndim == 4 else preprocess_image)(item, model.preprocess)
    return model.encode_patches(patches.pixel_values, patches.grid_thw).embeddings


def assert_rows_match(model, pixel_values, grids, expected) -> None:
    """A tower without deepstack: its rows for these patches equal `expected` (rows, out_hidden)."""
    out = model.encode_patches(pixel_values, grids)
    assert out.embeddings.shape == expected.shape and out.deepstack.shape == (0, *expected.shape)
    assert relative_error(out.embeddings, expected) <= TOLERANCE


@pytest.fixture(scope="module", params=sorted(TOWER_CONFIGS))
def bare_pair(request, tmp_path_factory):
    tower = build_tower(request.param, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    tower.save_pretrained(directory)
    return load_model(directory), tower


@pytest.mark.parametrize("case", sorted(CASES))
def test_bare_checkpoint_matches_hf(bare_pair, case):
    model, tower = bare_pair
    assert_matches(model, tower, CASES[case])


@pytest.mark.parametrize("name", ["hd20-pos20x20", "hd12-pos48x48"])
def test_sharded_full_checkpoint_matches_hf(tmp_path, name):
    tower = build_tower(name, seed=7)
    save_full_checkpoint(tower, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "the checkpoint should be sharded"
    assert any(k.startswith("model.visual.") for k in index["weight_map"])
    assert any(k.startswith("model.language_model.") for k in index["weight_map"])
    model = load_model(tmp_path)
    assert_matches(model, tower, CASES["images-and-videos"], seed=3)


def test_item_order_and_packing_do_not_change_results(bare_pair):
    """Packing items together gives each item the same rows as encoding it alone."""
    model, _ = bare_pair
    grids = CASES["images-and-videos"]
    pixel_values, grid_thw = random_patches(grids, seed=5)
    packed = model.encode_patches(pixel_values, grid_thw)
    start = 0
    for grid, rows in zip(grids, (g[0] * g[1] * g[2] for g in grids)):
        alone = model.encode_patches(pixel_values[start:start + rows], [grid])
        merged_start = start // 4
        torch.testing.assert_close(packed.embeddings[merged_start:merged_start + rows // 4], alone.embeddings,
                                   rtol=1e-5, atol=1e-5)
        start += rows
