"""The Qwen3-VL vision tower (also the Qwen3-VL-MoE one): our implementation, HF parameter names.

Module and parameter names match Hugging Face's `Qwen3VLVisionModel`, so checkpoints load
by name. The forward reads only tensors prepared by `metadata`, so it has no host syncs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitserve.preprocess.config import PreprocessConfig

from ..add_norm import add_layer_norm
from ..attention import AttentionFn
from ..protocol import EncoderGeometry, EncoderOutput
from ..rotary import rotary_qk
from ..tower import TowerBase
from .config import Qwen3VLVisionConfig
from ..token_metadata import TokenMetadata
from .metadata import qwen3_vl_metadata

LAYER_NORM_EPS = 1e-6  # hard-coded by the reference implementation


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # A Conv3d for checkpoint names; kernel == stride, so it runs as one GEMM. (cuDNN picks a
        # slow implicit-GEMM kernel for this conv: 1.7 ms at 8192 tokens against ~0.05 ms.)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (hidden, C*T*P*P)
        return F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)  # (tokens, hidden)


class Attention(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_width = config.head_dim  # memory width of q, k, v heads, as the attention backend wants
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, meta: TokenMetadata, attend: AttentionFn) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = rotary_qk(self.qkv(x), meta.rope_cos, meta.rope_sin, self.num_heads, self.head_width)  # (tokens, heads, head_dim) each
        out = attend(q, k, v, meta)  # (tokens, heads, head_dim)
        return self.proj(out.reshape(tokens, -1))  # (tokens, hidden)


class MLP(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.linear_fc1
        if x.is_cuda:
            # cuBLASLt applies the bias and the tanh GELU in the GEMM's epilogue: one kernel, and no
            # round trip of the (tokens, intermediate) activations through memory. (On the CPU this
            # private op uses the erf GELU, so it is CUDA only.)
            hidden = torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True)
        else:
            hidden = F.gelu(fc1(x), approximate="tanh")  # (tokens, intermediate)
        return self.linear_fc2(hidden)


class Block(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, normed: torch.Tensor, meta: TokenMetadata, attend: AttentionFn,
                next_norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block on the residual stream `x` and `normed` = norm1(x); returns the new stream
        and `next_norm` of it (the next block's norm1, or the merger's norm after the last block)."""
        x, normed = add_layer_norm(x, self.attn(normed, meta, attend), self.norm2)
        return add_layer_norm(x, self.mlp(normed), next_norm)  # (tokens, hidden) each


class PatchMerger(nn.Module):
    """2x2 merge of consecutive patches. The final merger normalises each patch before the
    merge; the deepstack mergers normalise the merged vector after it."""

    def __init__(self, config: Qwen3VLVisionConfig, norm_after_merge: bool):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.merged = merged
        self.norm_after_merge = norm_after_merge
        self.norm = nn.LayerNorm(merged if norm_after_merge else config.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            return self.project(self.norm(x.view(-1, self.merged)))  # (tokens / 4, out_hidden)
        return self.project(self.norm(x).view(-1, self.merged))

    def project(self, merged: torch.Tensor) -> torch.Tensor:
        """The MLP after the norm: (tokens / 4, 4 * hidden) -> (tokens / 4, out_hidden), exact erf GELU."""
        return self.linear_fc2(F.gelu(self.linear_fc1(merged)))


class Qwen3VLVisionTower(TowerBase):
    """Implements the `VisionEncoder` protocol."""

    def __init__(self, config: Qwen3VLVisionConfig, attention: str | None = None):
        super().__init__()
        self.config = config
        self.geometry = EncoderGeometry(
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            merge_size=config.spatial_merge_size,
            in_channels=config.in_channels,
            hidden_size=config.hidden_size,
            out_hidden_size=config.out_hidden_size,
            num_deepstack=len(config.deepstack_visual_indexes),
        )
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm_after_merge=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, norm_after_merge=True) for _ in config.deepstack_visual_indexes
        )
        self._deepstack_at = {layer: j for j, layer in enumerate(config.deepstack_visual_indexes)}
        self.requested_attention = attention
        self.model_type = "qwen3_vl"  # the checkpoint's config.json says which (load_model)
        self.weights_fingerprint = ""  # load_model's (models/fingerprint.py); empty for a tower built in code
        self.preprocess = PreprocessConfig()  # load_model gives a checkpoint's own

    # -- protocol ---------------------------------------------------------------------------
    def metadata(
        self,
        layout: torch.Tensor,
        num_tokens: int,
        num_sequences: int,
        max_seqlen: int,
        segment_lengths: Sequence[int] | None = None,
    ) -> TokenMetadata:
        return qwen3_vl_metadata(self.config, layout, num_tokens, num_sequences, max_seqlen, segment_lengths)

    def forward(self, pixel_values: torch.Tensor, meta: TokenMetadata) -> EncoderOutput:
        attend = self.attend()
        x = self.patch_embed(pixel_values)  # (tokens, hidden)
        positions = (self.pos_embed.weight[meta.pos_index] * meta.pos_weight[..., None]).sum(1)  # (tokens, hidden) fp32
        x = x + positions.to(x.dtype)
        normed = self.blocks[0].norm1(x)
        next_norms = [block.norm1 for block in self.blocks[1:]] + [self.merger.norm]
        deepstack = []
        for layer, (block, next_norm) in enumerate(zip(self.blocks, next_norms)):
            x, normed = block(x, normed, meta, attend, next_norm)
            if layer in self._deepstack_at:
                deepstack.append(self.deepstack_merger_list[self._deepstack_at[layer]](x))
        embeddings = self.merger.project(normed.view(-1, self.merger.merged))  # (tokens / 4, out_hidden)
        if deepstack:
            stacked = torch.stack(deepstack)  # (num_deepstack, tokens / 4, out_hidden)
        else:
            stacked = embeddings.new_empty((0, *embeddings.shape))
        return EncoderOutput(embeddings, stacked)

    def _embed_weight(self) -> torch.Tensor:
        return self.patch_embed.proj.weight

    def _attention_modules(self):
        return (block.attn for block in self.blocks)
