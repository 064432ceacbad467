"""The model runner on CPU with the tiny model: packed windows equal per-item encodes, in the caller's
order; the in-graph metadata path equals the host reference; stats."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitserve.models import load_model, pack_grids
from vitserve.workers import CostModel, ItemShape, ModelRunner, RunnerStats, WindowConfig, pack, resolve_capacities
from vitserve.workers.static_window import STAGING_DEPTH, StaticWindow

from runner_helpers import TOL, assert_equals_per_item, assert_items_tile_the_output, offsets_of, random_pixels


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


grid = st.tuples(st.integers(1, 4), st.integers(1, 8).map(lambda n: 2 * n), st.integers(1, 8).map(lambda n: 2 * n))


# -- packed outputs equal per-item outputs ------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(grids=st.lists(grid, min_size=1, max_size=10), seed=st.integers(0, 2**16))
def test_derived_budgets_match_per_item_encodes(model, grids, seed):
    runner = ModelRunner(model, WindowConfig(min_budget=64, max_budget=512))
    pixels = random_pixels(model, grids, seed)
    result = runner.encode(pixels, grids)
    assert result.output.shape == (pixels.shape[0] // 4, 3, 128)
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)


@settings(max_examples=8, deadline=None)
@given(grids=st.lists(grid, min_size=4, max_size=12), seed=st.integers(0, 2**16))
def test_explicit_small_capacities_split_into_many_windows(model, grids, seed):
    """Three items and four sequences per window at most; larger than the largest budget in total; one item
    too large for any budget and one with too many sequences run eagerly."""
    grids = [*grids, (1, 16, 18), (5, 2, 4)]  # 288 tokens > 256; 5 sequences > 4
    random.Random(seed).shuffle(grids)
    runner = ModelRunner(model, WindowConfig(budgets=(32, 64, 128, 256), max_items=3, max_sequences=4))
    pixels = random_pixels(model, grids, seed)
    assert pixels.shape[0] > 256
    result = runner.encode(pixels, grids)
    stats = runner.stats.summary()
    assert stats["windows"] >= 3
    assert stats["eager_runs"]["too_many_tokens"] >= 1 and stats["eager_runs"]["too_many_sequences"] >= 1
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)


def test_single_item_and_grid_as_tensor(model):
    runner = ModelRunner(model, WindowConfig(min_budget=64, max_budget=512))
    grids = [(2, 6, 4)]
    pixels = random_pixels(model, grids, 3)
    result = runner.encode(pixels, torch.tensor(grids))
    assert result.done is None
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)


def test_window_exactly_filling_its_budget_has_no_padding_segment(model):
    runner = ModelRunner(model, WindowConfig(budgets=(64, 128), max_items=2))
    grids = [(1, 8, 8), (1, 8, 8)]  # 128 tokens: one window of budget 128, no padding
    pixels = random_pixels(model, grids, 4)
    result = runner.encode(pixels, grids)
    assert runner.stats.summary()["windows_per_budget"] == {128: 1}
    assert runner.stats.summary()["padding_waste"] == 0.0
    assert_equals_per_item(model, result, pixels, grids)


def test_multi_item_eager_window_when_the_graph_is_slower(model):
    """A window whose budget's graph is predicted slower than eager runs unpadded, several items at once."""
    runner = ModelRunner(model, WindowConfig(budgets=(64, 256), max_items=4))
    runner.use_graphs = True  # pretend: graphs stay None, so a "graph" window would run eagerly over buffers
    slow = {shape: 1e9 for shape in runner.padded_shapes()}
    runner.cost = CostModel(padded_base_ms=slow, eager_base_points=[(1, 1.0), (1000, 2.0)])
    grids = [(1, 4, 6), (2, 6, 4), (1, 2, 2), (3, 4, 4)]
    pixels = random_pixels(model, grids, 5)
    result = runner.encode(pixels, grids)
    assert runner.stats.summary()["eager_runs"] == {"cheaper_than_graph": 1}
    assert runner.stats.summary()["windows_per_budget"] == {}
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)


# -- the caller's output buffer -----------------------------------------------------------------


def test_caller_output_buffer_is_filled_in_place(model):
    runner = ModelRunner(model, WindowConfig(budgets=(32, 64, 128), max_items=2))
    grids = [(1, 4, 6), (2, 6, 4), (1, 12, 12), (1, 2, 2)]  # the 144-token image runs eagerly
    pixels = random_pixels(model, grids, 6)
    rows = pixels.shape[0] // 4
    out = torch.full((rows, 3, 128), float("nan"))
    result = runner.encode(pixels, grids, out=out)
    assert result.output is out
    assert not out.isnan().any(), "every row of the caller's buffer is written"
    assert_items_tile_the_output(result, grids)
    assert_equals_per_item(model, result, pixels, grids)
    # A larger buffer viewed down to the right rows works too (a shared-memory slot).
    slab = torch.full((rows + 10, 3, 128), float("nan"))
    result = runner.encode(pixels, grids, out=slab[5:5 + rows])
    assert slab[:5].isnan().all() and slab[5 + rows:].isnan().all() and not slab[5:5 + rows].isnan().any()
    assert_equals_per_item(model, result, pixels, grids)


@pytest.mark.parametrize(
    "make",
    [
        lambda rows: torch.empty(rows + 1, 3, 128),
        lambda rows: torch.empty(rows, 2, 128),
        lambda rows: torch.empty(rows, 3, 64),
        lambda rows: torch.empty(rows * 3 * 128),
        lambda rows: torch.empty(rows, 3, 128, dtype=torch.float64),
        lambda rows: torch.empty(rows, 3, 128, dtype=torch.bfloat16),
        lambda rows: torch.empty(3, rows, 128).transpose(0, 1),  # right shape, not contiguous
    ],
    ids=["rows", "outputs", "hidden", "flat", "float64", "bfloat16", "non-contiguous"],
)
def test_wrong_output_buffer_is_rejected(model, make):
    runner = ModelRunner(model, WindowConfig(budgets=(64,)))
    grids = [(1, 4, 6)]
    pixels = random_pixels(model, grids)
    out = make(6)
    message = r"output buffer must be a contiguous torch\.float32 tensor of shape \(6, 3, 128\), got "
    with pytest.raises(ValueError, match=message):
        runner.encode(pixels, grids, out=out)
    assert runner.stats.windows == 0, "nothing ran"


def test_bad_inputs_are_rejected_before_running(model):
    runner = ModelRunner(model, WindowConfig(budgets=(64,)))
    with pytest.raises(ValueError, match=r"pixel_values has shape \(23, 1536\) but grid_thw .* needs \(24, 1536\)"):
        runner.encode(torch.zeros(23, 1536), [(1, 4, 6)])
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        runner.encode(torch.zeros(15, 1536), [(1, 3, 5)])
    with pytest.raises(ValueError, match="non-empty"):
        runner.encode(torch.zeros(0, 1536), [])
    assert runner.stats.windows == 0


# -- in-graph metadata equals the host reference -----------------------------------------------


def slot_choices(static, window) -> list[int]:
    """The slot tier the runner picks for the window, and the full capacity."""
    return sorted({static.capacities.fitting_slots(window.sequences), static.sequence_slots})


def staged_metadata(model, static, window, grids, pixels, slots):
    rows = static.stage(window, grids, pixels, offsets_of(grids))
    budget = window.budget
    return rows, model.metadata(static.layout, budget, slots, budget)


def assert_metadata_matches_reference(model, static, window, grids, meta, slots):
    budget = window.budget
    reference_grids = [grids[i] for i in window.items]
    packed = pack_grids(model, reference_grids)
    reference = model.metadata(packed.layout, packed.num_tokens, packed.num_sequences, packed.max_seqlen)
    tokens, sequences = packed.num_tokens, packed.num_sequences
    assert tokens == window.tokens and sequences == window.sequences
    assert meta.num_tokens == budget
    assert torch.equal(meta.pos_index[:tokens], reference.pos_index)
    assert torch.equal(meta.pos_weight[:tokens], reference.pos_weight)
    assert torch.equal(meta.rope_cos[:tokens], reference.rope_cos)
    assert torch.equal(meta.rope_sin[:tokens], reference.rope_sin)
    cu = meta.cu_seqlens.tolist()
    assert len(cu) == slots + 1
    assert cu[:sequences + 1] == reference.cu_seqlens.tolist()
    # Padding tokens: no position embedding, exactly one segment; every remaining segment is empty.
    assert torch.all(meta.pos_weight[tokens:] == 0)
    assert cu[sequences + 1] == budget
    assert cu[sequences + 1:] == [budget] * (slots - sequences)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    # Host lengths drop the empty segments (SDPA would run once per empty one); the rest agree.
    assert [n for n in lengths if n] == static.host_segment_lengths(window, grids, slots)


def test_staged_window_metadata_equals_host_reference(model):
    caps = resolve_capacities(WindowConfig(budgets=(64, 128, 256, 512), max_items=6, max_sequences=9), model.geometry)
    static = StaticWindow(model, caps, torch.device("cpu"), torch.float32)
    grids = [(1, 4, 6), (2, 6, 4), (1, 18, 10), (3, 2, 2), (1, 2, 16), (1, 2, 2), (4, 4, 2), (1, 8, 8)]
    pixels = random_pixels(model, grids, 7)
    windows = pack([ItemShape(t * h * w, t) for t, h, w in grids], caps)
    assert len(windows) >= 2 and all(w.budget is not None for w in windows)
    assert max(len(w.items) for w in windows) > min(len(w.items) for w in windows)
    assert any(w.tokens < w.budget for w in windows)
    # Stage the fullest window into every staging slot, then windows with fewer items: rows left in a reused
    # slot by a fuller window must not leak into a later one.
    by_items = sorted(windows, key=lambda w: -len(w.items))
    for window in [by_items[0]] * STAGING_DEPTH + [by_items[-1]] * STAGING_DEPTH + by_items:
        for slots in slot_choices(static, window):
            rows, meta = staged_metadata(model, static, window, grids, pixels, slots)
            assert_metadata_matches_reference(model, static, window, grids, meta, slots)
        # Staged pixels, and each item's first output row.
        cursor = 0
        offsets = offsets_of(grids)
        for row, index in zip(rows, window.items):
            assert row == cursor // 4
            n = offsets[index + 1] - offsets[index]
            assert torch.equal(static.pixels[cursor:cursor + n], pixels[offsets[index]:offsets[index + 1]])
            cursor += n
        # Unused layout rows point past every token and segment.
        unused = static.layout[len(window.items):]
        assert torch.all(unused[:, 0] == 0)
        assert torch.all(unused[:, 3] == window.budget) and torch.all(unused[:, 4] == static.sequence_slots)


@settings(max_examples=40, deadline=None)
@given(grids=st.lists(grid, min_size=1, max_size=6))
def test_staged_metadata_property(model, grids):
    caps = resolve_capacities(WindowConfig(budgets=(16, 96, 256, 1024), max_items=4, max_sequences=8), model.geometry)
    static = StaticWindow(model, caps, torch.device("cpu"), torch.float32)
    pixels = torch.zeros(sum(t * h * w for t, h, w in grids), model.geometry.patch_dim)
    for window in pack([ItemShape(t * h * w, t) for t, h, w in grids], caps):
        if window.budget is not None:
            for slots in slot_choices(static, window):
                _, meta = staged_metadata(model, static, window, grids, pixels, slots)
                assert_metadata_matches_reference(model, static, window, grids, meta, slots)


def test_graph_safe_forward_equals_per_item(model):
    """The path a CUDA graph captures (no host segment lengths: device-built mask) on padded buffers,
    with garbage in the padding rows."""
    caps = resolve_capacities(WindowConfig(budgets=(64, 256), max_items=4, max_sequences=8), model.geometry)
    static = StaticWindow(model, caps, torch.device("cpu"), torch.float32)
    grids = [(1, 4, 6), (2, 6, 4), (3, 2, 2), (1, 8, 10)]
    pixels = random_pixels(model, grids, 8)
    (window,) = pack([ItemShape(t * h * w, t) for t, h, w in grids], caps)
    assert window.budget == 256 and window.tokens == 164
    offsets = offsets_of(grids)
    for slots in slot_choices(static, window):
        static.pixels.normal_(std=1e3)  # stale rows past the window's tokens
        static.output.fill_(float("nan"))
        rows = static.stage(window, grids, pixels, offsets)
        with torch.inference_mode():
            static.forward(window.budget, slots)
        for row, index in zip(rows, window.items):
            t, h, w = grids[index]
            alone = model.encode_patches(pixels[offsets[index]:offsets[index + 1]], [grids[index]])
            count = t * h * w // 4
            torch.testing.assert_close(static.output[row:row + count, 0], alone.embeddings, **TOL)
            torch.testing.assert_close(static.output[row:row + count, 1:].transpose(0, 1), alone.deepstack, **TOL)
        assert torch.isfinite(static.output[:window.budget // 4]).all(), "every output row of the budget is written"


# -- stats --------------------------------------------------------------------------------------


def test_stats_of_a_known_packing(model):
    runner = ModelRunner(model, WindowConfig(budgets=(64, 128), max_items=2, max_sequences=4))
    grids = [
        (1, 4, 4),  # 16 tokens
        (1, 8, 8),  # 64
        (3, 4, 4),  # 48 tokens, 3 sequences
        (5, 2, 2),  # 20 tokens, 5 sequences: eager, too_many_sequences
        (1, 12, 12),  # 144 tokens: eager, too_many_tokens
        (1, 4, 4),  # 16
    ]
    # Windows: [64 + 48] in budget 128 (4 sequences), [16 + 16] in budget 64, then the two eager ones.
    pixels = random_pixels(model, grids, 9)
    result = runner.encode(pixels, grids)
    summary = runner.stats.summary()
    assert summary == {
        "windows": 4,
        "windows_per_budget": {64: 1, 128: 1},
        "graph_replays": 0,  # CPU: no graphs
        "eager_runs": {"too_many_tokens": 1, "too_many_sequences": 1},
        "padding_waste": (16 + 32) / (128 + 64),
        "items_per_window": 6 / 4,
        "sequences_per_window": (4 + 2 + 1 + 5) / 4,
        "tokens_per_window": (112 + 32 + 144 + 20) / 4,
    }
    assert_equals_per_item(model, result, pixels, grids)
    # Counters accumulate over encodes.
    runner.encode(pixels, grids)
    again = runner.stats.summary()
    assert again["windows"] == 8 and again["windows_per_budget"] == {64: 2, 128: 2}
    assert again["eager_runs"] == {"too_many_tokens": 2, "too_many_sequences": 2}
    assert again["padding_waste"] == summary["padding_waste"]


def test_empty_stats_summary():
    summary = RunnerStats().summary()
    assert summary["windows"] == 0 and summary["padding_waste"] == 0.0 and summary["items_per_window"] == 0.0
