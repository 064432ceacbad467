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
BUDGETS = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


@pytest.fixture(scope="module", params=["random:qwen3-vl-8b", "random:qwen3.5-0.8b", "random:glm-4.6v",
                                                "random:kimi-k2.5"])
def runner(request):
    from vitserve.models import load_model
    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model(request.param, device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(model, WindowConfig(budgets=BUDGETS, max_items=16, max_sequences=32))
    runner.capture(progress=False)
    runner.cost.eager_base_points.clear()  # no eager prediction: every window that fits replays its graph
    return runner


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


def test_every_budget_matches_per_item_eager(runner):
    rng = random.Random(0)
    worst_cosine, worst_error = 1.0, 0.0
    for low, high in zip((0, *BUDGETS[:-1]), BUDGETS):
        grids = random_items(rng, low, high)
        pixels = pixels_for(runner, grids, seed=high)
        before = runner.stats.graph_replays
        result = runner.encode(pixels, grids)
        assert runner.stats.graph_replays == before + 1
        assert runner.stats.budget_windows[high] >= 1
        start = 0
        for index, grid in enumerate(grids):
            rows = grid[0] * grid[1] * grid[2]
            alone = runner.model.encode_patches(pixels[start:start + rows], [grid])
            start += rows
            for ours, reference in ((result.embeddings(index), alone.embeddings),
                                    (result.deepstack(index), alone.deepstack)):
                if reference.numel() == 0:  # (a tower without deepstack)
                    assert ours.numel() == 0
                    continue
                ours = ours.to("cuda")
                assert torch.isfinite(ours).all()
                worst_cosine = min(worst_cosine, cosine(ours, reference))
                scale = reference.float().abs().max().item()
                worst_error = max(worst_error, (ours.float() - reference.float()).abs().max().item() / scale)
    print(f"\ngraph vs per-item eager over budgets {BUDGETS}: worst cosine {worst_cosine:.7f}, "
          f"worst max-abs/scale {worst_error:.2e}")
    assert worst_cosine >= MIN_COSINE
    assert worst_error <= 2 ** -5  # a few bf16 ulps of the output scale


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
