"""Per-token metadata built from a layout: equal to Hugging Face's helpers, and padding-safe."""

from __future__ import annotations

import pytest
import torch
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from vitserve.models import load_model, pack_grids

GRIDS = [(1, 4, 6), (2, 6, 4), (1, 18, 30), (3, 2, 2), (1, 64, 2)]


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def metadata_for(model, grids, extra_tokens=0, extra_sequences=0, host_lengths=True):
    packed = pack_grids(model, grids)
    lengths = list(packed.segment_lengths)
    if extra_tokens:
        lengths.append(extra_tokens)
    lengths += [0] * (extra_sequences - (1 if extra_tokens else 0))
    return model.metadata(
        packed.layout,
        packed.num_tokens + extra_tokens,
        packed.num_sequences + extra_sequences,
        max(lengths),
        lengths if host_lengths else None,
    ), packed


def test_metadata_equals_hf_helpers(model):
    meta, packed = metadata_for(model, GRIDS)
    grid_thw = torch.tensor(GRIDS)
    side = model.config.position_grid_side
    index, weight = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    assert torch.equal(meta.pos_index, index)
    assert torch.equal(meta.pos_weight, weight)
    assert torch.equal(meta.cu_seqlens, get_vision_cu_seqlens(grid_thw))
    # Rotary angles follow (row, col) positions in merge-window order.
    positions = get_vision_position_ids(grid_thw, 2).float()  # (tokens, 2)
    head_dim = model.config.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
    angles = torch.cat([positions[:, :1] * inv_freq, positions[:, 1:] * inv_freq], dim=-1)
    assert torch.equal(meta.rope_cos[:, 0], angles.cos())
    assert torch.equal(meta.rope_sin[:, 0], angles.sin())
    assert meta.max_seqlen == 18 * 30 == packed.max_seqlen


def test_padding_tokens_form_their_own_segment(model):
    meta, packed = metadata_for(model, GRIDS, extra_tokens=20, extra_sequences=4)
    real = packed.num_tokens
    cu = meta.cu_seqlens.tolist()
    assert cu[: packed.num_sequences + 1] == get_vision_cu_seqlens(torch.tensor(GRIDS)).tolist()
    assert cu[packed.num_sequences + 1:] == [real + 20] * 4  # padding segment, then empty ones
    assert torch.all(meta.pos_weight[real:] == 0)
    assert torch.all(meta.rope_cos[real:] == 1) and torch.all(meta.rope_sin[real:] == 0)


@pytest.mark.parametrize("host_lengths", [True, False], ids=["segment-loop", "block-mask"])
def test_padding_never_changes_real_outputs(model, host_lengths):
    packed = pack_grids(model, GRIDS)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(packed.num_tokens, model.geometry.patch_dim, generator=generator)
    plain = model.encode_patches(pixels, GRIDS)
    garbage = 1e3 * torch.randn(24, model.geometry.patch_dim, generator=generator)
    meta, _ = metadata_for(model, GRIDS, extra_tokens=24, extra_sequences=3, host_lengths=host_lengths)
    with torch.inference_mode():
        padded = model(torch.cat([pixels, garbage]), meta)
    rows = packed.num_tokens // 4
    torch.testing.assert_close(padded.embeddings[:rows], plain.embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.deepstack[:, :rows], plain.deepstack, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded.embeddings).all()


def test_encode_patches_rejects_inconsistent_inputs(model):
    pixels = torch.zeros(24, model.geometry.patch_dim)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(24, 1536\) but grid_thw .* needs \(48, 1536\)"):
        model.encode_patches(pixels, [(2, 4, 6)])
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        model.encode_patches(torch.zeros(15, 1536), [(1, 3, 5)])
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_patches(pixels, [])


def test_one_dimensional_grid_is_rejected_with_an_example(model):
    pixels = torch.zeros(16, model.geometry.patch_dim)
    for grid in (torch.tensor([1, 4, 4]), [1, 4, 4]):
        with pytest.raises(ValueError, match=r"\(items, 3\).*e\.g\. \[\[1, 4, 4\]\]"):
            model.encode_patches(pixels, grid)
