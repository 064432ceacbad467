"""What the towers' configs share: reading Hugging Face's `vision_config` spellings, and the checks every
tower's numbers pass before anything is built."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

RENAMED = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}  # HF's other spellings
PAIRS = ("image_size", "patch_size", "temporal_patch_size")  # HF allows [n, n] for these


def hf_fields(cls: type, vision: dict[str, Any]) -> dict[str, Any]:
    """The dataclass `cls`'s fields found in `vision` (either spelling; rope_theta aside: axial_rope_theta)."""
    fields = {field.name for field in dataclasses.fields(cls)} - {"rope_theta"}
    known = {RENAMED.get(key, key): value for key, value in vision.items() if RENAMED.get(key, key) in fields}
    known.update({key: vision[key] for key in fields & vision.keys()})  # (the field's own spelling wins)
    for name in PAIRS:
        if isinstance(known.get(name), list) and len(set(known[name])) == 1:
            known[name] = known[name][0]
    return known


def axial_rope_theta(vision: dict[str, Any], default: float) -> float:
    """The vision rotary's theta (5.x `rope_parameters` or 4.x `rope_theta`); only axial rope is run."""
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision config: rope_type {rope['rope_type']!r} is not supported (expected 'axial')")
    return float(rope.get("rope_theta", vision.get("rope_theta", default)))


def check_positive_ints(config: object, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"vision config: {name} must be a positive integer, got {value!r}")


def check_activation(name: str, supported: tuple[str, ...]) -> None:
    if name not in supported:
        raise ValueError(f"vision config: hidden_act {name!r} is not supported; expected one of {list(supported)}")
