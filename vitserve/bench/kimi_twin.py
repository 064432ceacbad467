"""Hugging Face's Kimi K2.5 vision tower and projector with our weights: `vitserve bench`'s baseline for
the family (its model's get_image_features, without the language model around them)."""

from __future__ import annotations

import re

import torch
from torch import nn

# our (the released checkpoints') names -> transformers' (its conversion mapping for kimi_k25)
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


class KimiTwin(nn.Module):
    """transformers' Kimi_K25VisionModel then Kimi_K25MultimodalProjection: rows (tokens, text hidden)."""

    def __init__(self, vision_tower: nn.Module, mm_projector: nn.Module, patch_size: int):
        super().__init__()
        self.vision_tower, self.mm_projector, self.patch_size = vision_tower, mm_projector, patch_size

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        patches = pixel_values.view(-1, 3, self.patch_size, self.patch_size)  # (tokens, C, P, P)
        return self.mm_projector(self.vision_tower(patches, grid_thw=grid_thw).pooler_output).squeeze(1)


def kimi_twin(model, attention: str = "sdpa") -> KimiTwin:
    """The twin of our Kimi tower, on its device, in its dtype, with its weights; `attention`: transformers'
    attn_implementation."""
    import transformers
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection

    config = model.config
    vision = dict(num_hidden_layers=config.depth, hidden_size=config.hidden_size, num_attention_heads=config.num_heads,
                  intermediate_size=config.intermediate_size, patch_size=config.patch_size,
                  pos_emb_height=config.pos_emb_height, pos_emb_width=config.pos_emb_width,
                  pos_emb_time=config.pos_emb_time, merge_kernel_size=[config.merge_size] * 2,
                  rope_parameters={"rope_type": "axial", "rope_theta": config.rope_theta})
    whole = transformers.Kimi_K25Config(vision_config=vision, text_config={"hidden_size": config.out_hidden_size},
                                        projection_hidden_size=config.hidden_size,
                                        projection_layer_norm_eps=config.projection_layer_norm_eps)
    weight = next(model.parameters())
    with torch.device(weight.device):
        tower = transformers.Kimi_K25VisionModel._from_config(whole.vision_config, attn_implementation=attention,
                                                                dtype=weight.dtype)
        projector = Kimi_K25MultimodalProjection(whole).to(weight.dtype)
    twin = KimiTwin(tower, projector, config.patch_size)
    twin.load_state_dict(hf_state(model.state_dict()))
    return twin.eval()


def hf_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' names: wqkv split (its q and k rows are in transformers' layout
    already: loading permuted them), the rest renamed."""
    state = {}
    for name, tensor in ours.items():
        if match := FUSED.match(name):
            layer, kind = match.groups()
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                state[f"vision_tower.layers.{layer}.attn.{part}.{kind}"] = piece
            continue
        for pattern, replacement in RENAMES:
            if re.search(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        state[name] = tensor
    return state
