"""Presets: the released Qwen3-VL vision configurations with seeded random weights."""

from __future__ import annotations

import torch
from torch import nn

from .qwen3_vl.config import Qwen3VLVisionConfig

PRESET_PREFIX = "random:"
PRESET_SEED = 0
INIT_STD = 0.02  # Hugging Face's initializer_range for these towers

_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=(5, 11, 17))
_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24))

PRESETS: dict[str, Qwen3VLVisionConfig] = {
    "qwen3-vl-2b": Qwen3VLVisionConfig(**_SMALL, out_hidden_size=2048),
    "qwen3-vl-4b": Qwen3VLVisionConfig(**_SMALL, out_hidden_size=2560),
    "qwen3-vl-8b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=4096),
    "qwen3-vl-32b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=5120),
    "qwen3-vl-30b-a3b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=2048),
    # A few narrow layers with a head dim that is not a power of two: CPU tests and demos.
    "tiny": Qwen3VLVisionConfig(
        depth=3, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=128,
        deepstack_visual_indexes=(0, 2),
    ),
}


def preset_config(source: str) -> Qwen3VLVisionConfig:
    name = source.removeprefix(PRESET_PREFIX)
    if name not in PRESETS:
        names = ", ".join(PRESET_PREFIX + n for n in PRESETS)
        raise ValueError(f"unknown model preset {source!r}; available presets: {names}")
    return PRESETS[name]


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = PRESET_SEED) -> None:
    """Seeded weights in the reference's initialisation, drawn on the CPU so every device
    gets the same model. Norms get a small perturbation so that tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            values = base + 0.1 * torch.randn(param.shape, generator=generator)
        elif name.endswith("bias"):
            values = 0.02 * torch.randn(param.shape, generator=generator)
        else:
            values = INIT_STD * torch.randn(param.shape, generator=generator)
        param.copy_(values)
