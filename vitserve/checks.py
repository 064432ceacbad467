"""Checks of user-set numbers, shared by the config classes: each error names the setting, the
value given and what to change."""

from __future__ import annotations

import math


def check_int(name: str, value: object, minimum: int, hint: str) -> None:
    """An int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}: {hint}")


def check_seconds(name: str, value: object, hint: str, *, zero_ok: bool = False, none_ok: bool = False) -> None:
    """A finite number of seconds, > 0 (or >= 0 with `zero_ok`); None only with `none_ok`."""
    if value is None and none_ok:
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a number of seconds {bound} ({hint}), got {value!r}")
