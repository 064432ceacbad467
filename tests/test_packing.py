"""Packing items into windows: properties over random items and capacities, and known cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vitserve.models import EncoderGeometry
from vitserve.workers import Capacities, ItemShape, Window, WindowConfig, pack, resolve_capacities
from vitserve.workers.capacities import derive_budgets
from vitserve.workers.packing import oversize_reason

GEOMETRY = EncoderGeometry(
    patch_size=16, temporal_patch_size=2, merge_size=2, in_channels=3, hidden_size=96, out_hidden_size=128,
    num_deepstack=2,
)
MERGE = GEOMETRY.merge_factor


@st.composite
def items(draw) -> list[ItemShape]:
    """Images and videos as the tiny model counts them: t*h*w tokens, t sequences."""
    grids = draw(st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 32).map(lambda n: 2 * n), st.integers(1, 32).map(lambda n: 2 * n)),
        min_size=0, max_size=40,
    ))
    return [ItemShape(t * h * w, t) for t, h, w in grids]


@st.composite
def capacities(draw) -> Capacities:
    """Any configuration that `resolve_capacities` accepts, explicit or derived."""
    if draw(st.booleans()):
        multiples = draw(st.lists(st.integers(1, 1024), min_size=1, max_size=6, unique=True))
        config = dict(budgets=tuple(sorted(MERGE * m for m in multiples)))
        smallest = config["budgets"][0]
    else:
        low = draw(st.integers(1, 512))
        high = draw(st.integers(low, 2048))
        config = dict(min_budget=MERGE * low, max_budget=MERGE * high)
        smallest = None
    if smallest is None:
        smallest = derive_budgets(config["min_budget"], config["max_budget"], MERGE)[0]
    max_items = min(64, smallest // MERGE)  # what resolve_capacities derives
    if draw(st.booleans()):
        max_items = config["max_items"] = draw(st.integers(1, smallest // MERGE))
    if draw(st.booleans()):
        config["max_sequences"] = draw(st.integers(max_items, max_items + 8))
    return resolve_capacities(WindowConfig(**config), GEOMETRY)


def check_packing(shapes: list[ItemShape], caps: Capacities, windows: list[Window]) -> None:
    # Every item is placed exactly once.
    placed = sorted(i for w in windows for i in w.items)
    assert placed == list(range(len(shapes)))
    for window in windows:
        assert window.items, "windows are never empty"
        assert window.tokens == sum(shapes[i].tokens for i in window.items)
        assert window.sequences == sum(shapes[i].sequences for i in window.items)
        reasons = [oversize_reason(shapes[i], caps) for i in window.items]
        if window.budget is None:
            # Eager windows hold exactly one item, and only one that no graph window can hold.
            assert len(window.items) == 1
            item = shapes[window.items[0]]
            assert item.tokens > caps.max_budget or item.sequences > caps.max_sequences
            assert reasons[0] in ("too_many_tokens", "too_many_sequences")
            assert window.padding == 0
        else:
            assert reasons == [None] * len(window.items), "an oversize item went into a graph window"
            assert window.budget in caps.budgets
            assert window.tokens <= window.budget <= caps.max_budget
            assert len(window.items) <= caps.max_items
            assert window.sequences <= caps.max_sequences
            # The budget is the smallest one that holds the tokens.
            assert window.budget == min(b for b in caps.budgets if b >= window.tokens)
            assert window.padding == window.budget - window.tokens >= 0
    # Every oversize item is alone in an eager window.
    eager_items = {w.items[0] for w in windows if w.budget is None}
    oversize = {i for i, s in enumerate(shapes) if s.tokens > caps.max_budget or s.sequences > caps.max_sequences}
    assert eager_items == oversize


@settings(max_examples=300, deadline=None)
@given(shapes=items(), caps=capacities())
def test_packing_properties(shapes, caps):
    windows = pack(shapes, caps)
    check_packing(shapes, caps, windows)
    assert pack(shapes, caps) == windows  # deterministic


@settings(max_examples=100, deadline=None)
@given(shapes=items())
def test_packing_properties_with_tight_capacities(shapes):
    """Few items and sequences per window: splits by every capacity, and 4-frame videos run eagerly."""
    caps = resolve_capacities(WindowConfig(budgets=(64, 256, 1024), max_items=2, max_sequences=3), GEOMETRY)
    check_packing(shapes, caps, pack(shapes, caps))


@settings(max_examples=100, deadline=None)
@given(shapes=items(), caps=capacities())
def test_graph_windows_could_not_have_been_merged_greedily(shapes, caps):
    """First-fit: every graph window but the first was opened because its first item fit no earlier one."""
    windows = [w for w in pack(shapes, caps) if w.budget is not None]
    for later, window in enumerate(windows):
        opener = shapes[window.items[0]]
        for earlier in windows[:later]:
            # At the time `opener` was placed, `earlier` held at most its final contents (items only grow);
            # items placed before opener are the larger ones, so compare against what was there then.
            before = [i for i in earlier.items if (-shapes[i].tokens, i) < (-opener.tokens, window.items[0])]
            tokens = sum(shapes[i].tokens for i in before)
            sequences = sum(shapes[i].sequences for i in before)
            assert (
                tokens + opener.tokens > caps.max_budget
                or sequences + opener.sequences > caps.max_sequences
                or len(before) >= caps.max_items
            )


def test_empty_list_packs_to_no_windows():
    caps = resolve_capacities(WindowConfig(budgets=(64,)), GEOMETRY)
    assert pack([], caps) == []


def test_known_packing_first_fit_decreasing():
    caps = resolve_capacities(WindowConfig(budgets=(64, 128), max_items=2, max_sequences=4), GEOMETRY)
    shapes = [
        ItemShape(16, 1),  # 0: image 4x4
        ItemShape(64, 1),  # 1: image 8x8
        ItemShape(48, 3),  # 2: video 3x4x4
        ItemShape(20, 5),  # 3: video 5x2x2: more sequences than a window holds
        ItemShape(144, 1),  # 4: image 12x12: more tokens than the largest budget
        ItemShape(16, 1),  # 5: image 4x4
    ]
    windows = pack(shapes, caps)
    assert windows == [
        Window(items=[1, 2], tokens=112, sequences=4, budget=128),  # 64 + 48; then full on sequences
        Window(items=[0, 5], tokens=32, sequences=2, budget=64),  # ties keep the caller's order
        Window(items=[4], tokens=144, sequences=1, budget=None),
        Window(items=[3], tokens=20, sequences=5, budget=None),
    ]
    reasons = [oversize_reason(s, caps) for s in shapes]
    assert reasons == [None, None, None, "too_many_sequences", "too_many_tokens", None]
    assert [w.padding for w in windows] == [16, 32, 0, 0]


def test_max_items_splits_windows():
    caps = resolve_capacities(WindowConfig(budgets=(64, 512), max_items=4), GEOMETRY)
    windows = pack([ItemShape(4, 1)] * 10, caps)
    assert [len(w.items) for w in windows] == [4, 4, 2]
    assert [w.budget for w in windows] == [64, 64, 64]


def test_item_exactly_the_largest_budget_uses_a_graph_window():
    caps = resolve_capacities(WindowConfig(budgets=(64, 128), max_items=2, max_sequences=4), GEOMETRY)
    assert pack([ItemShape(128, 4)], caps) == [Window([0], 128, 4, 128)]
    assert pack([ItemShape(132, 1)], caps) == [Window([0], 132, 1, None)]
    assert pack([ItemShape(16, 5)], caps) == [Window([0], 16, 5, None)]
    assert oversize_reason(ItemShape(132, 5), caps) == "too_many_tokens"  # tokens are named first
