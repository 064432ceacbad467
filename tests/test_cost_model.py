"""The runner's cost model: predictions from measured parts, the graph-or-eager choice, calibration."""

from __future__ import annotations

import math

import pytest

from runner_helpers import assert_equals_per_item, random_pixels
from vitserve.models import load_model
from vitserve.workers import CostModel, ModelRunner, WindowConfig


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")

# -- cost model ---------------------------------------------------------------------------------


def test_eager_ms_interpolates_and_extrapolates_linearly():
    cost = CostModel(eager_base_points=[(100, 10.0), (200, 30.0), (400, 50.0)])
    assert cost.eager_ms(100, 0) == 10.0 and cost.eager_ms(200, 0) == 30.0 and cost.eager_ms(400, 0) == 50.0
    assert cost.eager_ms(150, 0) == pytest.approx(20.0)
    assert cost.eager_ms(300, 0) == pytest.approx(40.0)
    assert cost.eager_ms(600, 0) == pytest.approx(70.0)  # past the last point: the last segment's slope
    assert cost.eager_ms(75, 0) == pytest.approx(5.0)  # before the first: the first segment's slope
    assert cost.eager_ms(10, 0) == 0.0  # never negative
    assert CostModel(eager_base_points=[(100, 10.0)]).eager_ms(250, 0) == pytest.approx(25.0)  # one point
    assert math.isnan(CostModel().eager_ms(100, 0))
    # Attention adds its time per squared segment length on top of the token-linear base.
    with_attention = CostModel(attention_ms_per_token2=1e-3, eager_base_points=cost.eager_base_points)
    assert with_attention.eager_ms(150, 2000) == pytest.approx(20.0 + 2.0)


def test_padded_ms_is_the_shape_base_plus_attention():
    cost = CostModel(attention_ms_per_token2=1e-3, padded_base_ms={(128, 5): 7.0})
    assert cost.padded_ms((128, 5), 0) == 7.0
    assert cost.padded_ms((128, 5), 128**2) == pytest.approx(7.0 + 16.384)


def test_prefer_padded_compares_the_padded_window_with_eager():
    shape = (128, 5)  # (budget, segment slots)
    cost = CostModel(padded_base_ms={shape: 25.0, (256, 5): 1.0}, eager_base_points=[(100, 10.0), (200, 30.0)])
    assert cost.prefer_padded(shape, 150, 0, 0) is False  # graph 25 ms > eager 20 ms
    assert cost.prefer_padded(shape, 190, 0, 0) is True  # graph 25 ms <= eager 28 ms
    assert cost.prefer_padded(shape, 175, 0, 0) is True  # equal: the graph
    assert cost.prefer_padded(None, 150, 0, 0) is False  # eager window
    assert cost.prefer_padded((512, 5), 150, 0, 0) is False  # shape never measured
    assert cost.prefer_padded((128, 9), 150, 0, 0) is False
    assert CostModel(padded_base_ms={shape: 25.0}).prefer_padded(shape, 100, 0, 0) is True  # no eager points
    # The padding segment's attention counts against the padded window.
    attention = CostModel(attention_ms_per_token2=1e-3, padded_base_ms={shape: 20.0},
                          eager_base_points=[(100, 10.0), (200, 30.0)])
    assert attention.prefer_padded(shape, 150, 1000, 0) is True  # 20 + 1 <= 20 + 1
    assert attention.prefer_padded(shape, 150, 1000, 10) is False  # 20 + 1.1 > 20 + 1


def test_calibrate_fills_every_budget_and_eager_points(model):
    runner = ModelRunner(model, WindowConfig(min_budget=64, max_budget=128))
    assert runner.capacities.budgets == (64, 96, 128)
    cost = runner.calibrate()
    assert cost is runner.cost
    shapes = runner.padded_shapes()
    assert {budget for budget, _ in shapes} == {64, 96, 128}
    assert {slots for _, slots in shapes} == set(runner.capacities.slot_tiers)
    assert set(cost.padded_base_ms) == set(shapes)
    assert all(math.isfinite(ms) for ms in cost.padded_base_ms.values())
    assert math.isfinite(cost.attention_ms_per_token2) and cost.attention_ms_per_token2 >= 0
    assert cost.eager_base_points, "eager fallback is measured"
    assert cost.eager_base_points == sorted(cost.eager_base_points)
    assert all(math.isfinite(ms) and tokens > 0 for tokens, ms in cost.eager_base_points)
    assert all(math.isfinite(cost.padded_ms(shape, 0)) for shape in shapes)
    assert math.isfinite(cost.eager_ms(1000, 1000))
    # capture() on CPU has no graphs to capture but still calibrates; encoding afterwards (the static
    # buffers hold calibration's dummy window) still equals per-item encodes.
    assert runner.capture(progress=False) is None
    grids = [(1, 4, 6), (2, 2, 2), (1, 12, 12)]
    pixels = random_pixels(model, grids, 10)
    assert_equals_per_item(model, runner.encode(pixels, grids), pixels, grids)


def test_calibration_with_an_off_grid_budget_predicts_every_window():
    """A max budget between two eager calibration sizes used to yield duplicate points (x1 == x0)."""
    model = load_model("random:tiny")
    runner = ModelRunner(model, WindowConfig(budgets=(300,)))
    cost = runner.calibrate()
    sizes = [tokens for tokens, _ in cost.eager_base_points]
    assert sizes == sorted(set(sizes))
    for tokens in (4, 200, 256, 300, 600):
        assert cost.eager_ms(tokens, tokens**2) >= 0.0


def test_duplicate_eager_points_do_not_divide_by_zero():
    cost = CostModel(eager_base_points=[(256, 1.0), (256, 1.5), (512, 2.0)])
    assert cost.eager_ms(200, 0) >= 0.0


def test_without_graphs_each_budget_is_timed_once_for_all_its_tiers(model, monkeypatch):
    """On the CPU (no graphs) a slot tier changes no kernel, and a forward takes the same time every
    run: calibration times one forward per budget (plus the attention pair and the eager points)
    instead of every (budget, tier) after a warm-up, which made a CPU start take minutes."""
    runner = ModelRunner(model, WindowConfig(min_budget=64, max_budget=256))
    forwards = []
    real_forward = runner.window.forward
    monkeypatch.setattr(runner.window, "forward", lambda *args: forwards.append(args[:2]) or real_forward(*args))
    cost = runner.calibrate()
    budgets, tiers = runner.capacities.budgets, runner.capacities.slot_tiers
    assert len(tiers) > 1
    assert len(forwards) == 1 + 2 + len(budgets)  # the set-up forward, the attention pair, one per budget
    assert set(cost.padded_base_ms) == set(runner.padded_shapes())
    for budget in budgets:
        assert len({cost.padded_base_ms[budget, tier] for tier in tiers}) == 1
