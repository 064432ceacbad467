"""Window capacities: derived budgets and capacities, and every start-up invariant with its message."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitserve.models import EncoderGeometry
from vitserve.workers import Capacities, WindowConfig, resolve_capacities
from vitserve.workers.capacities import MAX_DERIVED_ITEMS, SEQUENCES_PER_ITEM, derive_budgets

# The tiny preset's geometry: merge size 2, so merge² = 4 patch tokens per output token.
GEOMETRY = EncoderGeometry(
    patch_size=16, temporal_patch_size=2, merge_size=2, in_channels=3, hidden_size=96, out_hidden_size=128,
    num_deepstack=2,
)


def resolve(**fields) -> Capacities:
    return resolve_capacities(WindowConfig(**fields), GEOMETRY)


# -- derived values ----------------------------------------------------------------------------


def test_derive_budgets_default_range_steps_by_about_root_two():
    assert derive_budgets(256, 8192, 4) == (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def test_derive_budgets_appends_a_max_that_is_off_the_grid():
    assert derive_budgets(256, 5000, 4) == (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 5000)


def test_derive_budgets_single_budget_when_min_equals_max():
    assert derive_budgets(512, 512, 4) == (512,)
    assert derive_budgets(100, 100, 4) == (100,)


def test_derived_budgets_are_sorted_unique_multiples_of_merge_and_pad_at_most_a_third():
    budgets = derive_budgets(64, 65536, 4)
    assert list(budgets) == sorted(set(budgets))
    assert all(b % 4 == 0 for b in budgets)
    assert budgets[0] == 64 and budgets[-1] == 65536
    for smaller, larger in zip(budgets, budgets[1:]):
        assert larger / smaller <= 1.5 + 1e-9  # a window just over `smaller` pads by at most a third


def test_default_config_resolves_to_documented_capacities():
    capacities = resolve()
    assert capacities.budgets == (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
    assert capacities.max_budget == 8192
    assert capacities.merge_factor == 4
    assert capacities.max_items == min(MAX_DERIVED_ITEMS, 256 // 4) == 64
    assert capacities.max_sequences == SEQUENCES_PER_ITEM * 64 == 128


@pytest.mark.parametrize(
    ("fields", "max_items"),
    [
        ({"min_budget": 64, "max_budget": 512}, 16),  # smallest // 4
        ({"min_budget": 1024, "max_budget": 4096}, 64),  # capped at MAX_DERIVED_ITEMS
        ({"budgets": (8, 64)}, 2),
        ({"budgets": (4,)}, 1),
    ],
)
def test_derived_max_items_and_max_sequences(fields, max_items):
    capacities = resolve(**fields)
    assert capacities.max_items == max_items == min(64, capacities.budgets[0] // 4)
    assert capacities.max_sequences == 2 * max_items


def test_explicit_values_are_kept():
    capacities = resolve(budgets=[64, 128, 256], max_items=3, max_sequences=5)  # a list becomes a tuple
    assert capacities == Capacities((64, 128, 256), 3, 5, 4)
    assert resolve(budgets=(64,), max_items=16).max_sequences == 32  # derived from the explicit max_items
    assert resolve(budgets=(64,), max_items=16, max_sequences=16).max_sequences == 16  # equal is allowed


def test_fitting_budget_is_the_smallest_that_holds():
    capacities = resolve(budgets=(64, 96, 128))
    assert capacities.fitting_budget(1) == 64
    assert capacities.fitting_budget(64) == 64
    assert capacities.fitting_budget(65) == 96
    assert capacities.fitting_budget(128) == 128
    assert capacities.fitting_budget(129) is None


@pytest.mark.parametrize("max_sequences", [1, 2, 3, 4, 5, 16, 17, 31, 32, 128, 1000])
def test_slot_tiers_hold_every_sequence_count_plus_the_padding_segment(max_sequences):
    capacities = resolve(budgets=(4,), max_items=1, max_sequences=max_sequences)
    tiers = capacities.slot_tiers
    assert list(tiers) == sorted(set(tiers))
    assert tiers[-1] == max_sequences + 1  # the full capacity always has a tier
    assert tiers[0] >= 2  # one real segment and the padding one
    for sequences in range(1, max_sequences + 1):
        slots = capacities.fitting_slots(sequences)
        assert slots in tiers and slots >= sequences + 1
        assert all(tier < sequences + 1 for tier in tiers if tier < slots), "the smallest tier that holds"


def test_window_config_is_frozen():
    with pytest.raises(AttributeError):
        WindowConfig().max_items = 3  # type: ignore[misc]


# -- invariants and their messages -------------------------------------------------------------


def test_unsorted_budgets_are_rejected_with_the_sorted_list():
    with pytest.raises(ValueError, match=re.escape("budgets [128, 64] must be sorted and unique: use [64, 128]")):
        resolve(budgets=(128, 64))


def test_duplicate_budgets_are_rejected_with_the_unique_list():
    with pytest.raises(ValueError, match=re.escape("budgets [64, 64, 128] must be sorted and unique: use [64, 128]")):
        resolve(budgets=(64, 64, 128))


@pytest.mark.parametrize(("budgets", "bad", "rounded"), [((64, 130), 130, 132), ((1, 64), 1, 4), ((8190,), 8190, 8192)])
def test_budget_not_a_multiple_of_merge_suggests_the_rounded_up_value(budgets, bad, rounded):
    message = f"budget {bad} must be a multiple of 4 (merge size squared): use {rounded}"
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(budgets=budgets)
    assert resolve(budgets=(100,)).budgets == (100,)  # any multiple of 4 is a valid budget, not only powers of 2


@pytest.mark.parametrize("empty", [(), []])
def test_empty_budgets_are_rejected(empty):
    with pytest.raises(ValueError, match="budgets is empty: give at least one token budget, or leave it None"):
        resolve(budgets=empty)


@pytest.mark.parametrize("bad", [0, -64, 64.0, "64", True, None])
def test_non_positive_or_non_int_budget_is_rejected(bad):
    with pytest.raises(ValueError, match=re.escape(f"every budget must be a positive integer, got {bad!r}")):
        resolve(budgets=(bad, 128))


@pytest.mark.parametrize("name", ["min_budget", "max_budget", "max_items", "max_sequences"])
@pytest.mark.parametrize("bad", [0, -4, 8.0, "8", False])
def test_non_positive_or_non_int_scalars_are_rejected(name, bad):
    fields = {"min_budget": 64, "max_budget": 512, name: bad}
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a positive integer, got {bad!r}")):
        resolve(**fields)


def test_min_budget_above_max_budget_is_rejected_with_both_fixes():
    with pytest.raises(
        ValueError,
        match=re.escape("min_budget 1024 is larger than max_budget 512: lower min_budget to at most 512 or raise "
                        "max_budget"),
    ):
        resolve(min_budget=1024, max_budget=512)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_budget": 250, "max_budget": 512}, "min_budget 250 must be a multiple of 4 (merge size squared): use 252"),
        ({"min_budget": 256, "max_budget": 5001}, "max_budget 5001 must be a multiple of 4 (merge size squared): "
                                                  "use 5004"),
        ({"min_budget": 6, "max_budget": 6}, "min_budget 6 must be a multiple of 4 (merge size squared): use 8"),
    ],
)
def test_min_or_max_budget_not_a_multiple_of_merge_is_rejected(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(**fields)


def test_max_items_too_large_for_the_smallest_budget_names_both_fixes():
    with pytest.raises(ValueError) as error:
        resolve(budgets=(64, 128), max_items=17)
    message = str(error.value)
    assert "max_items 17 cannot fit in the smallest budget 64" in message
    assert "lower max_items to 16" in message
    assert "raise the smallest budget to 68" in message
    # The same check applies to derived budgets, and the boundary value is accepted.
    with pytest.raises(ValueError, match=r"lower max_items to 16 or raise the smallest budget to 80"):
        resolve(min_budget=64, max_budget=512, max_items=20)
    assert resolve(budgets=(64, 128), max_items=16).max_items == 16


def test_max_sequences_below_max_items_is_rejected():
    with pytest.raises(
        ValueError,
        match=re.escape("max_sequences 3 is below max_items 4: every item has at least one attention sequence, so "
                        "raise max_sequences to 4 or more"),
    ):
        resolve(budgets=(64,), max_items=4, max_sequences=3)


# -- extra budgets: exact fits for common item sizes ----------------------------------------------


def test_extra_budgets_join_the_derived_ones():
    capacities = resolve(extra_budgets=[784, 1764, 1024])  # a list is taken; 1024 is already derived
    assert capacities.budgets == (256, 384, 512, 768, 784, 1024, 1536, 1764, 2048, 3072, 4096, 6144, 8192)
    assert capacities.fitting_budget(784) == 784 and capacities.fitting_budget(785) == 1024


def test_extra_budgets_with_an_explicit_list_say_where_they_belong():
    with pytest.raises(ValueError, match=re.escape("extra_budgets [784] only add to derived budgets: put them into "
                                                   "budgets [512, 784, 1024] instead")):
        resolve(budgets=(512, 1024), extra_budgets=(784,))


@pytest.mark.parametrize(("extra", "message"), [
    (786, "extra budget 786 must be a multiple of 4 (merge size squared): use 788"),
    (16384, "extra budget 16384 is outside min_budget..max_budget (256..8192): widen the range or drop it"),
    (128, "extra budget 128 is outside min_budget..max_budget (256..8192): widen the range or drop it"),
    (0, "every extra budget must be a positive integer, got 0"),
])
def test_bad_extra_budgets_are_rejected_with_the_fix(extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(extra_budgets=(extra,))


def test_extra_budgets_must_be_a_sequence():
    with pytest.raises(ValueError, match=re.escape("extra_budgets must be a sequence of ints, e.g. (784,), got 784")):
        WindowConfig(extra_budgets=784)  # type: ignore[arg-type]


# -- a request's outputs against a worker's shared memory ---------------------------------------
@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.tuples(st.integers(4, 900), st.integers(1, 3)), min_size=1, max_size=40),
       slot_rows=st.sampled_from([1, 4, 16]), margin=st.integers(-3, 3))
def test_a_request_is_refused_exactly_when_its_packed_outputs_exceed_a_worker(items, slot_rows, margin):
    """check_request_fits skips the packing when each item in slots of its own fits: the verdict must
    be the packing's either way."""
    from vitserve.engine.errors import EngineError
    from vitserve.engine.outputs_layout import OutputLayout, check_request_fits, request_slots

    capacities = Capacities((64, 128, 256), 3, 5, 4)
    shapes = [(tokens * 4, segments) for tokens, segments in items]  # (patch tokens, segments)
    rows = [tokens for tokens, _ in items]  # merge² = 4 patch tokens per row
    needed = request_slots(shapes, rows, capacities, OutputLayout((3, 8), 3 * 8 * 2, slot_rows, 1))
    slots = max(1, needed + margin)  # a worker's memory just under, at or just over what the request needs
    layout = OutputLayout((3, 8), 3 * 8 * 2, slot_rows, slots)
    if needed > slots:
        with pytest.raises(EngineError, match="too_large|shared memory") as refused:
            check_request_fits(shapes, rows, capacities, layout, 4)
        assert refused.value.code == "too_large"
    else:
        check_request_fits(shapes, rows, capacities, layout, 4)
