"""The GLM-4.1V / 4.5V / 4.6V vision tower: our implementation, Hugging Face parameter names.

Against Qwen3-VL (models/qwen3_vl): RMSNorms (computed in float32, as the reference does), an
RMSNorm after the patch embedding, a 24x24 position table sampled bicubically (glm4v/positions.py),
SwiGLU blocks without biases, and a merger that is a 2x2 strided conv (run as one GEMM over the four
consecutive rows of a merge block) followed by a gated MLP. Items, segments and the packed layout
are Qwen3-VL's, so the runner, packer and graphs take it unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitserve.preprocess.config import released_preprocess

from ..attention import AttentionFn
from ..protocol import EncoderGeometry, EncoderOutput
from ..rotary import rotary_qk
from ..tower import TowerBase
from ..token_metadata import TokenMetadata, build_token_metadata
from .config import Glm4vVisionConfig
from .positions import bicubic_taps

MERGER_LAYER_NORM_EPS = 1e-5  # torch's default: the reference builds this LayerNorm without an eps


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 and rounded to the stream's dtype before the weight, as the reference does
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)  # (tokens, hidden)
        return self.weight * normed


class PatchEmbed(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (hidden, C*T*P*P): kernel == stride, so one GEMM
        return F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)  # (tokens, hidden)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (tokens, hidden)


class Attention(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_width = config.head_dim  # memory width of q, k, v heads, as the attention backend wants
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, meta: TokenMetadata, attend: AttentionFn) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = rotary_qk(self.qkv(x), meta.rope_cos, meta.rope_sin, self.num_heads, self.head_width)  # (tokens, heads, head_dim) each
        return self.proj(attend(q, k, v, meta).reshape(tokens, -1))  # (tokens, hidden)


class Block(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, config.out_hidden_size)  # (sic: out_hidden_size wide)

    def forward(self, x: torch.Tensor, meta: TokenMetadata, attend: AttentionFn) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), meta, attend)
        return x + self.mlp(self.norm2(x))  # (tokens, hidden)


class PatchMerger(nn.Module):
    """Linear, LayerNorm, erf GELU, then a SwiGLU `intermediate_size` wide."""

    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        out = config.out_hidden_size
        self.proj = nn.Linear(out, out, bias=False)
        self.post_projection_norm = nn.LayerNorm(out, eps=MERGER_LAYER_NORM_EPS)
        self.gate_proj = nn.Linear(out, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(out, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))  # (merged, out_hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (merged, out_hidden)


class Embeddings(nn.Module):
    def __init__(self, config: Glm4vVisionConfig):
        super().__init__()
        self.position_embedding = nn.Embedding(config.position_grid_side**2, config.hidden_size)


class Glm4vVisionTower(TowerBase):
    """Implements the `VisionEncoder` protocol."""

    def __init__(self, config: Glm4vVisionConfig, attention: str | None = None):
        super().__init__()
        self.config = config
        self.geometry = EncoderGeometry(
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            merge_size=config.spatial_merge_size,
            in_channels=config.in_channels,
            hidden_size=config.hidden_size,
            out_hidden_size=config.out_hidden_size,
            num_deepstack=0,
        )
        self.embeddings = Embeddings(config)
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        merge = config.spatial_merge_size
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, merge, stride=merge)
        self.merger = PatchMerger(config)
        self.requested_attention = attention
        self.model_type = "glm4v"  # the checkpoint's config.json says which (load_model)
        self.weights_fingerprint = ""  # load_model's (models/fingerprint.py); empty for a tower built in code
        self.preprocess = released_preprocess(self.model_type)  # load_model gives a checkpoint's own

    # -- protocol ---------------------------------------------------------------------------
    def metadata(
        self,
        layout: torch.Tensor,
        num_tokens: int,
        num_sequences: int,
        max_seqlen: int,
        segment_lengths: Sequence[int] | None = None,
    ) -> TokenMetadata:
        side = self.config.position_grid_side
        return build_token_metadata(
            layout, num_tokens, num_sequences, max_seqlen, segment_lengths, merge=self.config.spatial_merge_size,
            head_dim=self.config.head_dim, rope_theta=self.config.rope_theta,
            position_taps=lambda row, col, height, width: bicubic_taps(row, col, height, width, side),
        )

    def forward(self, pixel_values: torch.Tensor, meta: TokenMetadata) -> EncoderOutput:
        attend = self.attend()
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))  # (tokens, hidden)
        table = self.embeddings.position_embedding.weight
        # 16 taps per token summed without a (tokens, 16, hidden) intermediate, in float32 as the
        # reference samples; rounded to the table's dtype before the add, as it does
        positions = F.embedding_bag(meta.pos_index, table.float(), per_sample_weights=meta.pos_weight, mode="sum")
        x = x + positions.to(table.dtype)  # (tokens, hidden)
        for block in self.blocks:
            x = block(x, meta, attend)
        x = self.post_layernorm(x)
        merge_rows = self.config.spatial_merge_size**2
        # The 2x2 conv over a merge block's rows (stored consecutively, row-major within the block)
        # as one GEMM: weight (out, hidden, 2, 2) -> (out, 2, 2, hidden) -> (out, 4 * hidden)
        weight = self.downsample.weight.permute(0, 2, 3, 1).flatten(1)
        merged = F.linear(x.view(-1, merge_rows * x.shape[1]), weight, self.downsample.bias)  # (tokens / 4, out_hidden)
        embeddings = self.merger(merged)  # (tokens / 4, out_hidden)
        return EncoderOutput(embeddings, embeddings.new_empty((0, *embeddings.shape)))

    def _embed_weight(self) -> torch.Tensor:
        return self.patch_embed.proj.weight

    def _attention_modules(self):
        return (block.attn for block in self.blocks)
