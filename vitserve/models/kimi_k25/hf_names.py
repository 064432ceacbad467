"""Kimi K2.5's tensors under two spellings: the released checkpoints' (ours: a fused `wqkv` with q and
k in the interleaved-rotary layout, `encoder.blocks`, `mm_projector.proj.0/2`) and what transformers
holds in memory after its conversion mapping (q_proj/k_proj/v_proj with q and k in the rotate-half
layout, `layers`, `in_proj`/`out_proj`). The bench's Hugging Face twin goes one way (our tower's
state, already permuted at load); `verify` goes the other, to fingerprint a transformers model's
weights as the files store them."""

from __future__ import annotations

import re

import torch

# (ours, transformers') name starts; {n} is a block's number
NAMES = [
    ("vision_tower.patch_embed.pos_emb.weight", "vision_tower.patch_embed.pos_emb.position_embeddings"),
    ("vision_tower.encoder.blocks.{n}.norm0.", "vision_tower.layers.{n}.norm1."),
    ("vision_tower.encoder.blocks.{n}.norm1.", "vision_tower.layers.{n}.norm2."),
    ("vision_tower.encoder.blocks.{n}.wo.", "vision_tower.layers.{n}.attn.proj."),
    ("vision_tower.encoder.blocks.{n}.mlp.fc1.", "vision_tower.layers.{n}.mlp.fc2."),
    ("vision_tower.encoder.blocks.{n}.mlp.fc0.", "vision_tower.layers.{n}.mlp.fc1."),
    ("vision_tower.encoder.final_layernorm.", "vision_tower.final_layernorm."),
    ("mm_projector.proj.0.", "mm_projector.in_proj."),
    ("mm_projector.proj.2.", "mm_projector.out_proj."),
]
FUSED = re.compile(r"^vision_tower\.encoder\.blocks\.(\d+)\.wqkv\.(weight|bias)$")
SPLIT = re.compile(r"^vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")


def _rule(start: str, replacement: str) -> tuple[re.Pattern, str]:
    return re.compile("^" + re.escape(start).replace(re.escape("{n}"), r"(\d+)")), replacement.replace("{n}", r"\1")


RENAMES = [_rule(ours, theirs) for ours, theirs in NAMES]  # ours -> transformers'
BACK = [_rule(theirs, ours) for ours, theirs in NAMES]  # transformers' -> ours


def to_transformers(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (q and k rows already in the rotate-half layout, as loading leaves them) in
    transformers' names: wqkv split, the rest renamed."""
    state = {}
    for name, tensor in ours.items():
        if match := FUSED.match(name):
            layer, kind = match.groups()
            for part, piece in zip("qkv", tensor.chunk(3)):
                state[f"vision_tower.layers.{layer}.attn.{part}_proj.{kind}"] = piece
            continue
        state[_renamed(name, RENAMES)] = tensor
    return state


def from_transformers(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict in our names, q, k and v fused again (their rows still in the
    rotate-half layout: `weights.to_interleaved` gives the files' layout)."""
    state, parts = {}, {}
    for name, tensor in theirs.items():
        if match := SPLIT.match(name):
            layer, part, kind = match.groups()
            parts.setdefault((layer, kind), {})[part] = tensor
            continue
        state[_renamed(name, BACK)] = tensor
    for (layer, kind), qkv in parts.items():
        state[f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return state


def _renamed(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name
