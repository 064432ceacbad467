"""Kimi K2.5's tensors under two spellings: the released checkpoints' (ours: a fused `wqkv` with q and
k in the interleaved-rotary layout, `encoder.blocks`, `mm_projector.proj.0/2`) and what transformers
holds in memory after its conversion mapping (q_proj/k_proj/v_proj with q and k in the rotate-half
layout, `layers`, `in_proj`/`out_proj`). The bench's Hugging Face twin goes one way (our tower's
state, already permuted at load); `verify` goes the other, to fingerprint a transformers model's
weights as the files store them."""

from __future__ import annotations

import re

import torch

# ours -> transformers'
RENAMES = [
    (r"^vision_tower\.patch_embed\.pos_emb\.weight$", "vision_tower.patch_embed.pos_emb.position_embeddings"),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm0\.", r"vision_tower.layers.\1.norm1."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm1\.", r"vision_tower.layers.\1.norm2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.wo\.", r"vision_tower.layers.\1.attn.proj."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"vision_tower.layers.\1.mlp.fc2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc0\.", r"vision_tower.layers.\1.mlp.fc1."),
    (r"^vision_tower\.encoder\.final_layernorm\.", "vision_tower.final_layernorm."),
    (r"^mm_projector\.proj\.0\.", "mm_projector.in_proj."),
    (r"^mm_projector\.proj\.2\.", "mm_projector.out_proj."),
]
FUSED = re.compile(r"^vision_tower\.encoder\.blocks\.(\d+)\.wqkv\.(weight|bias)$")
SPLIT = re.compile(r"^vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")
# transformers' -> ours (RENAMES read backwards)
BACK = [
    (r"^vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"^vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"^vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"^vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"^mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"^mm_projector\.out_proj\.", "mm_projector.proj.2."),
]


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


def _renamed(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return name
