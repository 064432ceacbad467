"""Hugging Face reference models for parity tests: small random Qwen3-VL towers, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLVisionConfig, Qwen3VLVisionModel

# Small towers that still vary what matters: depth, head dims that are not powers of two,
# deepstack indexes (none, one, several), position grids other than the released 48x48.
TOWER_CONFIGS = {
    "hd16-pos8x8": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=96,
                        num_position_embeddings=64, deepstack_visual_indexes=[0]),
    "hd20-pos20x20": dict(depth=4, hidden_size=80, intermediate_size=100, num_heads=4, out_hidden_size=40,
                          num_position_embeddings=400, deepstack_visual_indexes=[1, 3]),
    "hd12-pos48x48": dict(depth=3, hidden_size=96, intermediate_size=64, num_heads=8, out_hidden_size=64,
                          num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2]),
    "hd24-no-deepstack": dict(depth=1, hidden_size=48, intermediate_size=96, num_heads=2, out_hidden_size=32,
                              num_position_embeddings=144, deepstack_visual_indexes=[]),
}

TINY_TEXT_CONFIG = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, vocab_size=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves norms at 1/0 and biases at 0; move them so parity covers them."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def build_tower(name: str, seed: int = 0) -> Qwen3VLVisionModel:
    torch.manual_seed(seed)
    model = Qwen3VLVisionModel(Qwen3VLVisionConfig(patch_size=16, **TOWER_CONFIGS[name])).eval()
    perturb_(model, seed)
    return model


def save_full_checkpoint(tower: Qwen3VLVisionModel, directory: Path, max_shard_size: str = "40KB") -> None:
    """A whole (tiny) Qwen3-VL model around `tower`, saved sharded: vision under `model.visual.`."""
    config = Qwen3VLConfig(vision_config=tower.config.to_dict(), text_config=TINY_TEXT_CONFIG)
    model = Qwen3VLForConditionalGeneration(config)
    model.model.visual.load_state_dict(tower.state_dict())
    model.save_pretrained(directory, max_shard_size=max_shard_size)


def random_patches(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    tokens = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(tokens, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(seed))
    return pixel_values, grid_thw


@torch.no_grad()
def reference_outputs(tower: Qwen3VLVisionModel, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    out = tower(pixel_values, grid_thw=grid_thw)
    return out.pooler_output, list(out.deepstack_features)


def greedy_tokens(model, prompts: list[tuple[list[int], dict]], new_tokens: int = 8) -> list[list[int]]:
    """The tokens `model.generate` adds greedily to each (prompt ids, pixel inputs)."""
    tokens = []
    for prompt, pixels in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tokens.append(out[0, ids.shape[1]:].tolist())
    return tokens
