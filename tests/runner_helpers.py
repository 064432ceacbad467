"""Shared helpers for the CPU runner tests."""

from __future__ import annotations

import torch

TOL = dict(rtol=1e-5, atol=1e-5)

def random_pixels(model, grids, seed=0) -> torch.Tensor:
    tokens = sum(t * h * w for t, h, w in grids)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, model.geometry.patch_dim, generator=generator)


def offsets_of(grids) -> list[int]:
    offsets = [0]
    for t, h, w in grids:
        offsets.append(offsets[-1] + t * h * w)
    return offsets


def assert_equals_per_item(model, result, pixels, grids):
    offsets = offsets_of(grids)
    for i, grid in enumerate(grids):
        alone = model.encode_patches(pixels[offsets[i]:offsets[i + 1]], [grid])
        torch.testing.assert_close(result.embeddings(i), alone.embeddings, **TOL)
        torch.testing.assert_close(result.deepstack(i), alone.deepstack, **TOL)


def assert_items_tile_the_output(result, grids):
    merge = 4
    assert [item.rows for item in result.items] == [t * h * w // merge for t, h, w in grids]
    spans = sorted((item.offset, item.offset + item.rows) for item in result.items)
    cursor = 0
    for start, end in spans:
        assert start == cursor, "items overlap or leave a gap"
        cursor = end
    assert cursor == result.output.shape[0], "items do not cover the output buffer"
