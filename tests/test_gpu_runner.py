"""On a GPU: budget graphs against per-item eager runs, for each family's tower: Qwen3-VL 8B-class
(deepstack, head dim 72), Qwen3.5 0.8B (no deepstack, head dim 64) and GLM-4.6V (RMSNorms, bicubic
positions, head dim 128, conv merger) and Kimi K2.5 (raster rows, chunks of 4 frames as one segment
averaged into one set of rows, its projector in the graph)."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MIN_COSINE = 0.9999
MIN_COSINE_BF16_ALONE = 0.9998  # two bfloat16 roundings of one function, each about 1.1e-4 from float32
BF16_ACCURACY_SLACK = 2e-5  # of cosine to float32, that the graph may lose against eager per item
BUDGETS = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


MODELS = ["random:qwen3-vl-8b", "random:qwen3.5-0.8b", "random:glm-4.6v", "random:kimi-k2.5"]


def budget_runner(model_name: str, dtype: torch.dtype):
    from vitserve.models import load_model
    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model(model_name, device="cuda", dtype=dtype)  # (a preset's weights are drawn from a fixed seed)
    runner = ModelRunner(model, WindowConfig(budgets=BUDGETS, max_items=16, max_sequences=32))
    runner.capture(progress=False)
    runner.cost.eager_base_points.clear()  # no eager prediction: every window that fits replays its graph
    return runner


@pytest.fixture(scope="module", params=MODELS)
def model_name(request):
    return request.param


@pytest.fixture(scope="module")
def runner(model_name):
    return budget_runner(model_name, torch.bfloat16)


@pytest.fixture(scope="module")
def float32_runner(model_name):
    return budget_runner(model_name, torch.float32)


def random_items(rng: random.Random, low: int, high: int) -> list[tuple[int, int, int]]:
    """Images and videos whose tokens add up to more than `low` and at most `high`."""
    while True:
        grids, tokens = [], 0
        while tokens <= low:
            t = rng.choice([1, 1, 1, 2, 3])
            h, w = 2 * rng.randint(4, 24), 2 * rng.randint(4, 24)
            grids.append((t, h, w))
            tokens += t * h * w
        if tokens <= high and len(grids) <= 16 and sum(g[0] for g in grids) <= 32:
            return grids


def pixels_for(runner, grids, seed):
    tokens = sum(t * h * w for t, h, w in grids)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    patch_dim = runner.model.geometry.patch_dim
    return torch.rand(tokens, patch_dim, device="cuda", generator=generator) * 2 - 1


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def windows_against_eager(runner, model=None):
    """For a random mix under every budget: the budget graph's outputs per item, with the eager
    outputs of each item alone (of `model`: the same tower in another dtype) and
    of the whole window at once. Yields (graph, alone, packed) per item, embeddings and deepstack."""
    model = model or runner.model
    rng = random.Random(0)
    for low, high in zip((0, *BUDGETS[:-1]), BUDGETS):
        grids = random_items(rng, low, high)
        pixels = pixels_for(runner, grids, seed=high)
        before = runner.stats.graph_replays
        result = runner.encode(pixels, grids)
        assert runner.stats.graph_replays == before + 1
        assert runner.stats.budget_windows[high] >= 1
        packed = model.encode_patches(pixels, grids)  # (the tower casts the pixels to its dtype)
        start, row = 0, 0
        for index, grid in enumerate(grids):
            tokens, rows = grid[0] * grid[1] * grid[2], runner.model.geometry.item_rows(*grid)
            alone = model.encode_patches(pixels[start:start + tokens], [grid])
            start += tokens
            item_rows = slice(row, row + rows)
            for ours, reference, whole in (
                    (result.embeddings(index), alone.embeddings, packed.embeddings[item_rows]),  # (rows, hidden)
                    (result.deepstack(index), alone.deepstack, packed.deepstack[:, item_rows])):  # (deepstack, rows, hidden)
                if reference.numel() == 0:  # (a tower without deepstack)
                    assert ours.numel() == 0
                    continue
                ours = ours.to("cuda")
                assert torch.isfinite(ours).all()
                yield ours, reference, whole
            row += rows


def test_every_budget_matches_per_item_eager_in_float32(float32_runner):
    """The graphs compute each item's eager function: in float32, where rounding cannot hide a
    wrong position, segment or pooling, every item of a packed window equals the item run alone."""
    worst = min(cosine(ours, alone) for ours, alone, _ in windows_against_eager(float32_runner))
    print(f"\nfloat32 graph vs per-item eager over budgets {BUDGETS}: worst cosine {worst:.7f}")
    assert worst >= MIN_COSINE


def test_every_budget_matches_eager_in_bfloat16(runner, float32_runner):
    """In bfloat16, the graph is as close to the float32 result as each item run alone eagerly is,
    and within two bfloat16 roundings of it. (Not 0.9999 to the item alone: a packed window's matrix
    products have other shapes, so other kernels round otherwise, and a random tower's bfloat16
    error is about 1.1e-4 in cosine. Kimi's graph at budget 4096 measured 0.99990 to the items
    alone and 1.0000000 to eager on the same window; graph and eager were both 0.99989 to float32.)"""
    exact = float32_runner.model
    worst_packed = worst_alone = 1.0
    for (ours, alone, packed), (_, exact_alone, _) in zip(windows_against_eager(runner),
                                                          windows_against_eager(runner, exact)):
        worst_packed = min(worst_packed, cosine(ours, packed))
        worst_alone = min(worst_alone, cosine(ours, alone))
        assert cosine(ours, exact_alone) >= cosine(alone, exact_alone) - BF16_ACCURACY_SLACK
        scale = alone.float().abs().max().item()
        assert (ours.float() - alone.float()).abs().max().item() / scale <= 2 ** -5  # a few bf16 ulps of the scale
    print(f"\nbfloat16 graph over budgets {BUDGETS}: worst cosine {worst_packed:.7f} to the same window eager, "
          f"{worst_alone:.7f} to each item alone")
    assert worst_alone >= MIN_COSINE_BF16_ALONE


def test_poisoned_output_rows_are_all_overwritten(runner):
    grids = [(1, 8, 10), (2, 6, 4)]  # 128 tokens in the 256 budget: half of the window is padding
    runner.window.output.fill_(float("nan"))
    geometry = runner.model.geometry
    rows = sum(geometry.item_rows(*grid) for grid in grids)  # (32; 26 when Kimi averages the video's 2 frames)
    destination = torch.full((rows, 1 + geometry.num_deepstack, geometry.out_hidden_size),
                             float("nan"), dtype=torch.bfloat16, pin_memory=True)
    before = runner.stats.budget_windows[BUDGETS[0]]
    runner.encode(pixels_for(runner, grids, 1), grids, out=destination)
    assert runner.stats.budget_windows[BUDGETS[0]] == before + 1
    assert torch.isfinite(destination).all()
    # Every row of the budget, padding rows included, was written by the replay.
    assert torch.isfinite(runner.window.output[:BUDGETS[0] // 4]).all()


def test_earlier_outputs_survive_later_replays(runner):
    rng = random.Random(1)
    grids = random_items(rng, 1024, 1536)
    first = runner.encode(pixels_for(runner, grids, 2), grids)
    snapshot = first.output.clone()
    for high in (BUDGETS[-1], BUDGETS[0], BUDGETS[4]):
        later = random_items(rng, high // 2, high)
        runner.encode(pixels_for(runner, later, high), later)
    assert torch.equal(first.output, snapshot)


def test_400_random_windows_show_no_drift(runner):
    rng = random.Random(2)
    probe_grids = [(1, 28, 28), (2, 16, 12)]
    probe = pixels_for(runner, probe_grids, 3)
    reference = runner.encode(probe, probe_grids).output.clone()
    windows = 0
    while windows < 400:
        high = rng.choice(BUDGETS)
        grids = random_items(rng, high // 3, high)
        out = runner.encode(pixels_for(runner, grids, windows), grids).output
        assert torch.isfinite(out).all()
        windows += 1
        if windows % 50 == 0:
            assert torch.equal(runner.encode(probe, probe_grids).output, reference)
    print(f"\n400 windows: {runner.stats.summary()}")
