"""The Kimi K2.5 vision tower (MoonViT-3D) with its projector: our implementation, with the parameter
names of the released checkpoints (`vision_tower.*`, `mm_projector.*`; what transformers also writes).

Against Qwen3-VL (models/qwen3_vl): one pixel row per patch and frame (a Conv2d: no temporal patch)
in raster order; a video's chunks of up to 4 frames each attend as one segment and are averaged into
one frame of rows after the final LayerNorm (kimi_k25/metadata.py gives each token its output slot);
a 64x64 bicubic position table plus a sin-cos time row; interleaved rotary. The projector (LayerNorm
per patch, the 2x2 block concatenated, two linears) runs in the same forward, so rows come out
as wide as the text model: what the decoder's placeholders take.
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
from .config import KimiK25VisionConfig
from .metadata import KimiMetadata, kimi_metadata, time_table

LAYER_NORM_EPS = 1e-5  # the reference's, hard-coded


class Block(nn.Module):
    """Pre-norm block; q, k and v in one GEMM (`wqkv`, what the rotary kernel reads), its q and k rows
    permuted at load to the rotate-half layout (kimi_k25/weights.py)."""

    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_width = config.head_dim  # memory width of q, k, v heads, as the attention backend wants
        self.norm0 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, meta: KimiMetadata, attend: AttentionFn) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = rotary_qk(self.wqkv(self.norm0(x)), meta.rope_cos, meta.rope_sin, self.num_heads,
                            self.head_width)  # (tokens, heads, head_dim) each
        x = x + self.wo(attend(q, k, v, meta).reshape(tokens, -1))
        return x + self.mlp(self.norm1(x))  # (tokens, hidden)


class MLP(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # bias and tanh GELU in the GEMM's epilogue (see qwen3_vl/model.py)
            hidden = torch._addmm_activation(self.fc0.bias, x, self.fc0.weight.t(), use_gelu=True)
        else:
            hidden = F.gelu(self.fc0(x), approximate="tanh")  # (tokens, intermediate)
        return self.fc1(hidden)


class PositionEmbedding(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.pos_emb_height, config.pos_emb_width, config.hidden_size))


class PatchEmbed(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.pos_emb = PositionEmbedding(config)


class Encoder(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)


class VisionModel(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.encoder = Encoder(config)


class Projector(nn.Module):
    def __init__(self, config: KimiK25VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.merge_size**2
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.projection_layer_norm_eps)
        self.proj = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        merged = self.pre_norm(blocks).flatten(1)  # (rows, 4 * hidden): each patch normalised, then joined
        return self.proj(merged)  # (rows, out_hidden)


class KimiK25VisionTower(TowerBase):
    """Implements the `VisionEncoder` protocol."""

    def __init__(self, config: KimiK25VisionConfig, attention: str | None = None):
        super().__init__()
        self.config = config
        self.geometry = EncoderGeometry(
            patch_size=config.patch_size,
            temporal_patch_size=1,
            merge_size=config.merge_size,
            in_channels=config.in_channels,
            hidden_size=config.hidden_size,
            out_hidden_size=config.out_hidden_size,
            num_deepstack=0,
            temporal_pool=config.pos_emb_time,
        )
        self.vision_tower = VisionModel(config)
        self.mm_projector = Projector(config)
        self.requested_attention = attention
        self.model_type = "kimi_k25"  # the checkpoint's config.json says which (load_model)
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
    ) -> KimiMetadata:
        return kimi_metadata(self.config, layout, num_tokens, num_sequences, max_seqlen, segment_lengths)

    def forward(self, pixel_values: torch.Tensor, meta: KimiMetadata) -> EncoderOutput:
        """Rows (tokens / 4, out_hidden): each item's rows at the running sum of `geometry.item_rows`;
        rows past the last item's are padding (fewer rows than tokens / 4 when a chunk has frames)."""
        attend = self.attend()
        tower = self.vision_tower
        weight = tower.patch_embed.proj.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.flatten(1), tower.patch_embed.proj.bias)  # (tokens, hidden)
        table = tower.patch_embed.pos_emb.weight.flatten(0, 1)  # (64 * 64, hidden)
        # bicubic taps summed in the table's dtype, as the reference does; the time row in float32
        positions = F.embedding_bag(meta.pos_index, table, per_sample_weights=meta.pos_weight.to(table.dtype),
                                    mode="sum")  # (tokens, hidden)
        times = time_table(self.config.hidden_size, self.config.pos_emb_time, x.device)[meta.time_index]
        x = x + (positions + times).to(x.dtype)
        for block in tower.encoder.blocks:
            x = block(x, meta, attend)
        x = tower.encoder.final_layernorm(x)
        tokens, hidden = x.shape
        pooled = x.new_zeros((tokens, hidden), dtype=torch.float32)  # the mean over a chunk's frames, in float32
        for frame in range(meta.merge_source.shape[1]):  # frames added in order: the same sums in any window
            pooled += x[meta.merge_source[:, frame]].float() * meta.merge_weight[:, frame, None]
        blocks = pooled.to(x.dtype).view(tokens // self.config.merge_size**2, -1, hidden)  # (rows, 4, hidden)
        embeddings = self.mm_projector(blocks)  # (tokens / 4, out_hidden)
        return EncoderOutput(embeddings, embeddings.new_empty((0, *embeddings.shape)))

    def _embed_weight(self) -> torch.Tensor:
        return self.vision_tower.patch_embed.proj.weight

    def _attention_modules(self):
        return self.vision_tower.encoder.blocks
