"""Kimi K2.5's vision tower on its own, with the random tiny preset and no transformers model: the
runner's budget windows of images and videos (several per window, chunks sharing rows, and an item
too large for any budget) equal per-item encodes, a window's padding never reaches its rows, the
cost model calibrates on budgets of any size, and the engine leases a video the rows its chunks
give. Everything checked against Hugging Face transformers' Kimi K2.5 is in
test_kimi_k25_transformers.py."""

from __future__ import annotations

import torch

from vitserve.models import load_model

PATCH_DIM = 3 * 14 * 14


def test_the_runner_packs_kimi_windows_equal_to_per_item_encodes():
    """Budget windows (the path a CUDA graph replays, eager on the CPU over static buffers) of images and
    videos whose chunks share rows, several per window, and an item too large for any budget."""
    from runner_helpers import assert_equals_per_item, random_pixels

    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model("random:tiny-kimi")
    runner = ModelRunner(model, WindowConfig(budgets=(64, 128, 256), max_items=4, max_sequences=6))
    # (8, 8, 8): too large for any budget, its 8 frames averaged into 2 chunks' rows on the eager path
    grids = [(1, 4, 6), (6, 6, 4), (1, 2, 2), (3, 4, 4), (1, 16, 18), (9, 2, 2), (2, 2, 8), (8, 8, 8)]
    pixels = random_pixels(model, grids, seed=7)
    result = runner.encode(pixels, grids)
    rows = [model.geometry.item_rows(*grid) for grid in grids]
    assert [item.rows for item in result.items] == rows and result.output.shape == (sum(rows), 1, 128)
    assert runner.stats.summary()["windows"] >= 2 and runner.stats.summary()["eager_runs"]["too_many_tokens"] == 2
    assert_equals_per_item(model, result, pixels, grids)


def test_a_windows_padding_never_reaches_its_rows():
    """Padding tokens hold whatever an earlier window left (here values near float32's largest): the
    temporal merge must not add even zero times them to a real row (inf * 0 is NaN)."""
    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model("random:tiny-kimi")
    runner = ModelRunner(model, WindowConfig(budgets=(64, 256), max_items=4, max_sequences=6))
    runner.encode(torch.full((256, PATCH_DIM), 3e38), [(1, 16, 16)])  # fills the static window's pixels
    pixels = torch.randn(16, PATCH_DIM, generator=torch.Generator().manual_seed(3))
    result = runner.encode(pixels, [(1, 4, 4)])  # 16 tokens in the 64 budget: 48 of padding
    assert runner.stats.summary()["windows_per_budget"].get(64) == 1
    torch.testing.assert_close(result.embeddings(0), model.encode_patches(pixels, [(1, 4, 4)]).embeddings,
                               rtol=1e-5, atol=1e-5)


def test_the_cost_model_calibrates_kimi_on_budgets_of_any_size():
    """Calibration runs segments of 4 frames, each a whole number of merge blocks, whatever the budgets."""
    from vitserve.workers import ModelRunner, WindowConfig

    runner = ModelRunner(load_model("random:tiny-kimi"), WindowConfig(budgets=(64, 108)))
    runner.capture(progress=False)
    assert runner.cost.eager_base_points and all(ms >= 0 for _, ms in runner.cost.eager_base_points)


def test_a_video_window_leases_the_rows_its_chunks_give_not_a_row_per_merge_block():
    """A video's frames pool in chunks of 4 into one set of rows: its window leases those rows (a
    quarter of tokens / 4 for a whole chunk), and its rows read back as the eager model's."""
    import asyncio

    import numpy as np

    from vitserve import Engine, EngineConfig
    from vitserve.models.protocol import item_rows
    from vitserve.preprocess import preprocess_video
    from vitserve.workers import WindowConfig

    video = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)

    async def run() -> None:
        config = EngineConfig(model="random:tiny-kimi", window=WindowConfig(min_budget=64, max_budget=512),
                              max_item_tokens=4096)
        async with Engine(config) as engine:
            with await engine.encode([video]) as result:
                grid = result.items[0].grid
                rows = item_rows(grid, 4, 4)
                assert grid == (8, 8, 8) and rows == 32 and result.items[0].embeddings.shape[0] == rows
                leased = engine.stats()["slots_leased"]
                assert leased == engine.layout.slots_for(rows) < engine.layout.slots_for(8 * 8 * 8 // 4)
                model = load_model("random:tiny-kimi")
                patches = preprocess_video(video, model.preprocess)
                expected = model.encode_patches(patches.pixel_values, patches.grid_thw).embeddings
                torch.testing.assert_close(result.items[0].embeddings, expected, atol=1e-5, rtol=1e-5)

    asyncio.run(run())
