"""On a GPU: the 8B-class tower in bf16 with torch_varlen attention agrees with Hugging Face's SDPA path."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

# Items of the kinds the engine packs together: small and large images, a non-square one, videos.
GRIDS = [(1, 28, 28), (1, 64, 64), (1, 20, 36), (1, 16, 16), (4, 16, 16), (2, 28, 20)]
MIN_COSINE = 0.9999


def hf_tower_like(model):
    from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

    config = model.config.to_dict()
    config.pop("rope_theta")
    hf_config = Qwen3VLVisionConfig(**config)
    with torch.device("cuda"):
        hf = Qwen3VLVisionModel._from_config(hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    hf.load_state_dict(model.state_dict())
    # The rotary frequencies must stay float32, as in a from_pretrained load.
    assert hf.rotary_pos_emb.inv_freq.dtype == torch.float32
    return hf.eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8b_tower_bf16_torch_varlen_matches_hf_sdpa():
    from vitserve.models import load_model

    model = load_model("random:qwen3-vl-8b", device="cuda", dtype=torch.bfloat16, attention="torch_varlen")
    assert model.attention_backend == "torch_varlen"
    hf = hf_tower_like(model)
    grid_thw = torch.tensor(GRIDS)
    tokens = int(grid_thw.prod(-1).sum())
    generator = torch.Generator(device="cuda").manual_seed(0)
    pixel_values = torch.rand(tokens, model.geometry.patch_dim, device="cuda", generator=generator) * 2 - 1

    ours = model.encode_patches(pixel_values, grid_thw)
    with torch.inference_mode():
        # The HF model casts inputs to its dtype first, as its get_image_features does.
        reference = hf(pixel_values.to(torch.bfloat16), grid_thw=grid_thw.cuda())
    outputs = [(ours.embeddings, reference.pooler_output)]
    outputs += list(zip(ours.deepstack, reference.deepstack_features, strict=True))

    worst_cosine, worst_abs = 1.0, 0.0
    for ours_out, ref_out in outputs:
        assert torch.isfinite(ours_out).all()
        start = 0
        for t, h, w in GRIDS:
            rows = t * h * w // 4
            a, b = ours_out[start:start + rows], ref_out[start:start + rows]
            worst_cosine = min(worst_cosine, cosine(a, b))
            worst_abs = max(worst_abs, ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
            start += rows
    print(f"\n8B tower bf16, torch_varlen vs HF sdpa over {len(GRIDS)} items and "
          f"{len(outputs)} outputs: worst cosine {worst_cosine:.6f}, worst max-abs/scale {worst_abs:.3e}")
    assert worst_cosine >= MIN_COSINE
    assert worst_abs < 0.05  # a few bf16 ulps of the output scale
