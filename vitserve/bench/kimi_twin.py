"""Hugging Face's Kimi K2.5 vision tower and projector with our weights: `vitserve bench`'s baseline for
the family (its model's get_image_features, without the language model around them)."""

from __future__ import annotations

import torch
from torch import nn

from vitserve.models.kimi_k25.hf_names import to_transformers


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
    twin.load_state_dict(to_transformers(model.state_dict()))
    return twin.eval()
