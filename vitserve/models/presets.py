"""Presets: the released vision configurations of the families vitserve runs, with seeded random weights."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .fingerprint import TensorDigest, combine, tensor_digest
from .glm4v.config import Glm4vVisionConfig
from .kimi_k25.config import KimiK25VisionConfig
from .qwen3_vl.config import Qwen3VLVisionConfig

PRESET_PREFIX = "random:"
PRESET_SEED = 0
INIT_STD = 0.02  # Hugging Face's initializer_range for these towers
PARAMETER_SEEDS = 1 << 20  # more than any tower's parameter count: seeds of two presets' seeds never meet
INIT_THREADS = 16
LARGE_TOWER_PARAMETERS = 50_000_000  # towers this large are built without default init and drawn in threads

_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=(5, 11, 17))
_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24))

PRESETS: dict[str, Qwen3VLVisionConfig | Glm4vVisionConfig | KimiK25VisionConfig] = {
    "qwen3-vl-2b": Qwen3VLVisionConfig(**_SMALL, out_hidden_size=2048),
    "qwen3-vl-4b": Qwen3VLVisionConfig(**_SMALL, out_hidden_size=2560),
    "qwen3-vl-8b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=4096),
    "qwen3-vl-32b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=5120),
    "qwen3-vl-30b-a3b": Qwen3VLVisionConfig(**_LARGE, out_hidden_size=2048),
    # Qwen3.5: the Qwen3-VL tower without deepstack (head dim 64 for 0.8B, 72 for the others)
    "qwen3.5-0.8b": Qwen3VLVisionConfig(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                                        out_hidden_size=1024, deepstack_visual_indexes=()),
    "qwen3.5-2b": Qwen3VLVisionConfig(**{**_SMALL, "deepstack_visual_indexes": ()}, out_hidden_size=2048),
    "qwen3.5-4b": Qwen3VLVisionConfig(**{**_SMALL, "deepstack_visual_indexes": ()}, out_hidden_size=2560),
    "qwen3.5-9b": Qwen3VLVisionConfig(**{**_LARGE, "deepstack_visual_indexes": ()}, out_hidden_size=4096),
    "qwen3.5-27b": Qwen3VLVisionConfig(**{**_LARGE, "deepstack_visual_indexes": ()}, out_hidden_size=5120),
    "qwen3.5-35b-a3b": Qwen3VLVisionConfig(**{**_LARGE, "deepstack_visual_indexes": ()}, out_hidden_size=2048),
    "qwen3.5-122b-a10b": Qwen3VLVisionConfig(**{**_LARGE, "deepstack_visual_indexes": ()}, out_hidden_size=3072),
    "qwen3.5-397b-a17b": Qwen3VLVisionConfig(**{**_LARGE, "deepstack_visual_indexes": ()}, out_hidden_size=4096),
    # GLM-4.xV (vision-towers.md §2): 4.1V-9B and 4.6V-Flash use the class defaults, 4.5V and 4.6V a
    # narrower merger
    "glm-4.1v-9b": Glm4vVisionConfig(),
    "glm-4.6v-flash": Glm4vVisionConfig(),
    "glm-4.5v": Glm4vVisionConfig(intermediate_size=10944),
    "glm-4.6v": Glm4vVisionConfig(intermediate_size=10944),
    # Kimi K2.5 and K2.6: the class defaults; rows as wide as DeepSeek-V3's hidden size (the projector's out)
    "kimi-k2.5": KimiK25VisionConfig(),
    "kimi-k2.6": KimiK25VisionConfig(),
    # A few narrow layers with a head dim that is not a power of two: CPU tests and demos.
    "tiny": Qwen3VLVisionConfig(
        depth=3, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=128,
        deepstack_visual_indexes=(0, 2),
    ),
    "tiny-glm": Glm4vVisionConfig(depth=3, hidden_size=96, num_heads=4, out_hidden_size=128, intermediate_size=160),
    "tiny-kimi": KimiK25VisionConfig(depth=3, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=128,
                                     pos_emb_height=16, pos_emb_width=16),
}
# Hugging Face's model_type of the checkpoints a preset stands for (the Qwen3-VL one when not named)
PRESET_MODEL_TYPES = {
    **{name: "qwen3_5" for name in PRESETS if name.startswith("qwen3.5-")},
    "glm-4.1v-9b": "glm4v", "glm-4.6v-flash": "glm46v", "glm-4.5v": "glm4v_moe", "glm-4.6v": "glm46v",
    "tiny-glm": "glm4v",
    "kimi-k2.5": "kimi_k25", "kimi-k2.6": "kimi_k25", "tiny-kimi": "kimi_k25",
}


def large_tower(config: Qwen3VLVisionConfig | Glm4vVisionConfig | KimiK25VisionConfig) -> bool:
    """Whether a tower has about LARGE_TOWER_PARAMETERS or more (its blocks' attention and MLP weights)."""
    hidden = config.hidden_size
    if isinstance(config, Glm4vVisionConfig):  # a SwiGLU out_hidden_size wide: three matrices
        mlp = 3 * hidden * config.out_hidden_size
    else:
        mlp = 2 * hidden * config.intermediate_size
    return config.depth * (4 * hidden * hidden + mlp) >= LARGE_TOWER_PARAMETERS


def preset_model_type(source: str) -> str:
    """Hugging Face's model_type of the family a preset comes from."""
    return PRESET_MODEL_TYPES.get(source.removeprefix(PRESET_PREFIX), "qwen3_vl")


def preset_config(source: str) -> Qwen3VLVisionConfig | Glm4vVisionConfig | KimiK25VisionConfig:
    name = source.removeprefix(PRESET_PREFIX)
    if name not in PRESETS:
        names = ", ".join(PRESET_PREFIX + n for n in PRESETS)
        raise ValueError(f"unknown model preset {source!r}; available presets: {names}")
    return PRESETS[name]


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = PRESET_SEED) -> str:
    """Seeded weights in the reference's initialisation, drawn on the CPU so every device
    gets the same model. Norms get a small perturbation so that tests exercise them. Each
    parameter has a generator of its own (seeded by `seed` and its index), so they are drawn in
    parallel threads (torch releases the GIL) and still come out the same on every run.
    Returns the weights' fingerprint (of the float32 values drawn)."""
    digests: dict[str, TensorDigest] = {}

    def fill(indexed: tuple[int, tuple[str, nn.Parameter]]) -> None:
        index, (name, param) = indexed
        generator = torch.Generator().manual_seed(seed * PARAMETER_SEEDS + index)
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if "norm" in name:
            values.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
        else:
            values.mul_(0.02 if name.endswith("bias") else INIT_STD)
        with torch.no_grad():  # per thread: the caller's no_grad does not reach the pool's threads
            param.copy_(values)
        digests[name] = tensor_digest(values)  # (one key per thread: no lock needed)

    parameters = list(enumerate(model.named_parameters()))
    if sum(param.numel() for _, (_, param) in parameters) < LARGE_TOWER_PARAMETERS:
        for indexed in parameters:  # threads would cost more than they save
            fill(indexed)
    else:
        with ThreadPoolExecutor(max_workers=min(INIT_THREADS, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, parameters))
    return combine(digests)
