"""Kimi K2.5's NaViT sizing: one image or video frame scaled down (never up) to a patch budget and a side
limit, then padded with zeros at the bottom and right to whole merged patches; and the most patches it gives.

The arithmetic follows Hugging Face's `navit_resize` (image_processing_kimi_k25.py, the video processor's
copy) operation for operation: the budget counts whole patches of the input (H // patch, W // patch, each
at least 1), the scale is a float, and sides are truncated with int().
"""

from __future__ import annotations

import functools
import math


def navit_resize(
    height: int, width: int, *, patch_size: int, merge_size: int, max_patches: int, max_patches_per_side: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, resized width), (padded height, padded width)) in pixels."""
    patches_high = max(1.0, height // patch_size)
    patches_wide = max(1.0, width // patch_size)
    side_limit = max_patches_per_side * patch_size
    scale = min(1.0, math.sqrt(max_patches / (patches_high * patches_wide)), side_limit / height, side_limit / width)
    resized_height = min(max(1, int(height * scale)), side_limit)
    resized_width = min(max(1, int(width * scale)), side_limit)
    factor = patch_size * merge_size
    return (resized_height, resized_width), (_round_up(resized_height, factor), _round_up(resized_width, factor))


@functools.lru_cache(maxsize=64)
def navit_most_patches(
    *, patch_size: int, merge_size: int, max_patches: int, max_patches_per_side: int, max_short_side: int
) -> int:
    """An upper bound on the patches (padded grid h * w) of one frame whose shorter side is at most
    `max_short_side` pixels.

    The budget counts whole input patches, so a frame can end above it. With a = max(1, H // P) and
    b = max(1, W // P) (taking a <= b: the rule is symmetric), H < P (a + 1), W < P (b + 1) and the scale
    is at most sqrt(M / (a b)), so the resized x <= min(side limit, P (a + 1) - 1) and y <= side limit
    have x * y < P^2 M (1 + 1/a)(1 + 1/b); and as y <= W, b > y / P - 1: so x <= curve(y), which is
    P^2 M (1 + 1/a)^2 / y below y = P (a + 1) and P^2 M (1 + 1/a) / (y - P) above. Padding adds under one
    merged patch (f pixels) a side, so the grid is at most (x + f - 1)(y + f - 1) / P^2: increasing in x
    and y, and convex along each piece of the curve, so it is largest where the edge of the region
    (x = min(x limit, curve(y))) bends: at y = P (a + 1), at the side limit, or where the curve meets the
    x limit. Every a up to the short side's is checked.
    """
    patch, factor = patch_size, patch_size * merge_size
    side_limit = max_patches_per_side * patch
    pad = factor - 1  # a padded side is at most this many pixels longer than the resized one
    budget = patch * patch * max_patches * (1 + 1e-9)  # with slack for the float scale
    most = 0.0
    for short in range(1, max(1, max_short_side // patch) + 1):  # a: the short side's whole input patches
        near, far = budget * (1 + 1 / short) ** 2, budget * (1 + 1 / short)
        bend = patch * (short + 1)  # y from which b > y / P - 1 bounds b better than b >= a does

        def curve(wide: float) -> float:
            return near / wide if wide < bend else far / (wide - patch)

        short_most = min(side_limit, bend - 1)
        meets = (near / short_most, patch + far / short_most)  # where each piece reaches the x limit
        for wide in (bend, side_limit, *meets):
            wide = min(wide, side_limit)
            most = max(most, (min(short_most, curve(wide)) + pad) * (wide + pad))
    grid_side = merge_size * -(-side_limit // factor)  # the most patches a padded side can have
    return min(int(most // (patch * patch)), grid_side * grid_side)


def _round_up(pixels: int, factor: int) -> int:
    return -(-pixels // factor) * factor
