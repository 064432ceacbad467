"""Window capacities: token budgets, items and attention sequences per window.

A window is one forward pass over a packed run of items. It has three capacities: patch
tokens (its budget, one of a few sizes that each get a CUDA graph), items, and attention
sequences (segments). They are given or derived here and checked once, at construction,
with errors that say which value to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitserve.models import EncoderGeometry

DEFAULT_MIN_BUDGET = 256  # one 256x256 image: the smallest the released processor config produces
DEFAULT_MAX_BUDGET = 8192
MAX_DERIVED_ITEMS = 64
SEQUENCES_PER_ITEM = 2  # derived sequence capacity: room for videos of a few temporal patches


@dataclass(frozen=True)
class WindowConfig:
    """What the user sets. Leave a field None to derive it.

    budgets: explicit token budgets; otherwise derived from min_budget..max_budget in steps
        of about 1.41x (2^k and 1.5 * 2^k), so a window pads by at most a third.
    extra_budgets: added to the derived budgets: exact fits for item sizes common in your
        traffic (784 tokens for a 448x448 image pads to 1024 otherwise, 30% more work).
    max_items / max_sequences: per-window capacities; derived from the smallest budget.
    graphs: capture CUDA graphs (on CUDA); False runs the very same path eagerly.
    """

    budgets: tuple[int, ...] | None = None
    min_budget: int = DEFAULT_MIN_BUDGET
    max_budget: int = DEFAULT_MAX_BUDGET
    extra_budgets: tuple[int, ...] = ()
    max_items: int | None = None
    max_sequences: int | None = None
    graphs: bool = True

    def __post_init__(self) -> None:
        if self.budgets is not None:
            if isinstance(self.budgets, (str, bytes)) or not hasattr(self.budgets, "__iter__"):
                raise ValueError(f"budgets must be a sequence of ints, e.g. (256, 512), got {self.budgets!r}")
            object.__setattr__(self, "budgets", tuple(self.budgets))
        if isinstance(self.extra_budgets, (str, bytes)) or not hasattr(self.extra_budgets, "__iter__"):
            raise ValueError(f"extra_budgets must be a sequence of ints, e.g. (784,), got {self.extra_budgets!r}")
        object.__setattr__(self, "extra_budgets", tuple(self.extra_budgets))
        # What needs no model is checked here, before anything slow starts; what needs its merge size
        # (multiples of merge²) when a worker resolves the capacities
        for name in ("min_budget", "max_budget"):
            _check_positive(name, getattr(self, name))
        for name in ("max_items", "max_sequences"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for budget in self.budgets or ():
            _check_positive("every budget", budget)
        for budget in self.extra_budgets:
            _check_positive("every extra budget", budget)
        if self.budgets is None and self.min_budget > self.max_budget:
            raise ValueError(f"min_budget {self.min_budget} is larger than max_budget {self.max_budget}: lower "
                             f"min_budget to at most {self.max_budget} or raise max_budget")


@dataclass(frozen=True)
class Capacities:
    """Resolved, checked capacities of every window."""

    budgets: tuple[int, ...]  # sorted, unique, multiples of merge²
    max_items: int
    max_sequences: int  # real segments; one more slot always exists for the padding segment
    merge_factor: int  # patch tokens per output token

    @property
    def max_budget(self) -> int:
        return self.budgets[-1]

    @property
    def slot_tiers(self) -> tuple[int, ...]:
        """Segment slots a window's graph may have (real segments plus one for padding).

        FlashAttention's varlen grid is (max_seqlen / 128) x slots x heads, and empty slots still
        launch; so each budget gets graphs for a few slot counts and a window takes the
        smallest that holds its segments.
        """
        most = self.max_sequences + 1
        tiers, power = {most}, 1
        while power + 1 < most:
            tiers.add(power + 1)
            power *= 4
        return tuple(sorted(tiers))

    def fitting_slots(self, sequences: int) -> int | None:
        """The smallest slot tier holding `sequences` real segments and the padding one, or None
        when none does (such a window runs eagerly)."""
        return next((s for s in self.slot_tiers if s >= sequences + 1), None)

    def fitting_budget(self, tokens: int) -> int | None:
        """The smallest budget that holds `tokens`, or None when none does."""
        return next((b for b in self.budgets if b >= tokens), None)


def derive_budgets(min_budget: int, max_budget: int, merge_factor: int) -> tuple[int, ...]:
    budgets, power = [min_budget], 1
    while power <= max_budget:
        for size in (power, power * 3 // 2):
            if min_budget <= size <= max_budget and size % merge_factor == 0:
                budgets.append(size)
        power *= 2
    if not budgets or budgets[-1] != max_budget:
        budgets.append(max_budget)
    return tuple(sorted(set(budgets)))


def resolve_capacities(config: WindowConfig, geometry: EncoderGeometry) -> Capacities:
    merge = geometry.merge_factor
    if config.budgets is not None:
        if config.extra_budgets:
            raise ValueError(
                f"extra_budgets {list(config.extra_budgets)} only add to derived budgets: put them into "
                f"budgets {sorted(set(config.budgets) | set(config.extra_budgets))} instead"
            )
        budgets = _check_budget_list(config.budgets, merge)
    else:
        _check_positive("min_budget", config.min_budget)
        _check_positive("max_budget", config.max_budget)
        if config.min_budget > config.max_budget:
            raise ValueError(
                f"min_budget {config.min_budget} is larger than max_budget {config.max_budget}: lower "
                f"min_budget to at most {config.max_budget} or raise max_budget"
            )
        for name in ("min_budget", "max_budget"):
            value = getattr(config, name)
            if value % merge:
                raise ValueError(
                    f"{name} {value} must be a multiple of {merge} (merge size squared): use "
                    f"{_round_up(value, merge)}"
                )
        budgets = derive_budgets(config.min_budget, config.max_budget, merge)
        for extra in config.extra_budgets:
            _check_positive("every extra budget", extra)
            if extra % merge:
                raise ValueError(f"extra budget {extra} must be a multiple of {merge} (merge size squared): use "
                                 f"{_round_up(extra, merge)}")
            if not config.min_budget <= extra <= config.max_budget:
                raise ValueError(f"extra budget {extra} is outside min_budget..max_budget "
                                 f"({config.min_budget}..{config.max_budget}): widen the range or drop it")
        budgets = tuple(sorted(set(budgets) | set(config.extra_budgets)))

    smallest = budgets[0]
    max_items = config.max_items
    if max_items is None:
        max_items = min(MAX_DERIVED_ITEMS, smallest // merge)
    _check_positive("max_items", max_items)
    if max_items * merge > smallest:
        raise ValueError(
            f"max_items {max_items} cannot fit in the smallest budget {smallest}: every item needs at "
            f"least {merge} tokens (one merge window), so lower max_items to {smallest // merge} or "
            f"raise the smallest budget to {max_items * merge}"
        )
    max_sequences = config.max_sequences
    if max_sequences is None:
        max_sequences = SEQUENCES_PER_ITEM * max_items
    _check_positive("max_sequences", max_sequences)
    if max_sequences < max_items:
        derived = " (derived from the smallest budget)" if config.max_items is None else ""
        raise ValueError(
            f"max_sequences {max_sequences} is below max_items {max_items}{derived}: every item has at least "
            f"one attention sequence, so raise max_sequences to {max_items} or more, or set max_items to "
            f"{max_sequences} or less"
        )
    return Capacities(budgets, max_items, max_sequences, merge)


def _check_budget_list(budgets: tuple[int, ...], merge: int) -> tuple[int, ...]:
    if not budgets:
        raise ValueError("budgets is empty: give at least one token budget, or leave it None to derive them")
    for budget in budgets:
        _check_positive("every budget", budget)
        if budget % merge:
            raise ValueError(
                f"budget {budget} must be a multiple of {merge} (merge size squared): use {_round_up(budget, merge)}"
            )
    if list(budgets) != sorted(set(budgets)):
        raise ValueError(f"budgets {list(budgets)} must be sorted and unique: use {sorted(set(budgets))}")
    return tuple(budgets)


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
