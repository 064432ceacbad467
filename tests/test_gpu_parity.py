"""On a GPU: the 8B-class tower in bf16 agrees with Hugging Face's SDPA path on the same weights.

Two bf16 runs that differ in one kernel's accumulation order differ by about 1.2e-4 of cosine
on this random tower: HF's own bf16 output is only ~0.99988 from its float32 output, and HF with
SDPA's flash kernel differs from HF with SDPA's default pick (cuDNN on an H100) by as much. So
the checks are: with the same attention kernel (sdpa) we agree with HF; with
torch_varlen we stay within 2e-4 of cosine of HF's runs and are at least as close to the
float32 reference as HF's own bf16 run is. (The patch embedding runs as a GEMM, not HF's conv
kernel, which is 30x slower here, so results are not bit-identical to HF even with SDPA.)
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Items of the kinds the engine packs together: small and large images, a non-square one, videos.
GRIDS = [(1, 28, 28), (1, 64, 64), (1, 20, 36), (1, 16, 16), (4, 16, 16), (2, 28, 20)]
MIN_COSINE = 0.9998  # see the module docstring: 0.9999 is below bf16's own error here


def hf_tower_like(model):
    from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

    config = model.config.to_dict()
    config.pop("rope_theta")
    with torch.device("cuda"):
        hf = Qwen3VLVisionModel._from_config(Qwen3VLVisionConfig(**config), attn_implementation="sdpa",
                                             dtype=torch.bfloat16)
    hf.load_state_dict(model.state_dict())
    assert hf.rotary_pos_emb.inv_freq.dtype == torch.float32  # as after from_pretrained(dtype=bf16)
    return hf.eval()


def per_item_cosines(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Cosine per item and per output (merged embeddings and every deepstack feature)."""
    cosines = []
    for x, y in zip(a, b, strict=True):
        start = 0
        for t, h, w in GRIDS:
            rows = t * h * w // 4
            cosines.append(torch.nn.functional.cosine_similarity(
                x[start:start + rows].double().flatten(), y[start:start + rows].double().flatten(), dim=0).item())
            start += rows
    return cosines


@pytest.fixture(scope="module")
def runs():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitserve.models import load_model

    model = load_model("random:qwen3-vl-8b", device="cuda", dtype=torch.bfloat16, attention="torch_varlen")
    assert model.attention_backend == "torch_varlen"
    hf = hf_tower_like(model)
    grid_thw = torch.tensor(GRIDS)
    tokens = int(grid_thw.prod(-1).sum())
    generator = torch.Generator(device="cuda").manual_seed(0)
    pixel_values = torch.rand(tokens, model.geometry.patch_dim, device="cuda", generator=generator) * 2 - 1

    results = {"ours": model.encode_patches(pixel_values, grid_thw)}
    model.select_attention("sdpa")
    results["ours_sdpa"] = model.encode_patches(pixel_values, grid_thw)
    with torch.inference_mode():
        # HF's get_image_features casts the processor's float32 values to the model dtype first.
        results["hf_default"] = hf(pixel_values.to(torch.bfloat16), grid_thw=grid_thw.cuda())
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            results["hf_flash"] = hf(pixel_values.to(torch.bfloat16), grid_thw=grid_thw.cuda())
        results["hf_fp32"] = hf.float()(pixel_values, grid_thw=grid_thw.cuda())
    return {name: outputs(out) for name, out in results.items()}


def outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "pooler_output"):
        return [out.pooler_output, *out.deepstack_features]
    return [out.embeddings, *out.deepstack]


def test_outputs_are_finite(runs):
    assert all(torch.isfinite(x).all() for x in runs["ours"])


def test_same_attention_kernel_agrees_with_hf(runs):
    cosines = per_item_cosines(runs["ours_sdpa"], runs["hf_default"])
    print(f"\nours sdpa vs HF sdpa (default kernel): worst per-item cosine {min(cosines):.7f}")
    assert min(cosines) >= MIN_COSINE


@pytest.mark.parametrize("reference", ["hf_default", "hf_flash"])
def test_torch_varlen_agrees_with_hf_sdpa(runs, reference):
    cosines = per_item_cosines(runs["ours"], runs[reference])
    hf_own = per_item_cosines(runs["hf_flash"], runs["hf_default"])
    print(f"\nours torch_varlen vs HF sdpa ({reference}): worst per-item cosine {min(cosines):.7f} "
          f"(HF flash vs HF default: {min(hf_own):.7f})")
    assert min(cosines) >= MIN_COSINE


def test_torch_varlen_is_as_accurate_as_hf_bf16(runs):
    ours = per_item_cosines(runs["ours"], runs["hf_fp32"])
    hf = per_item_cosines(runs["hf_default"], runs["hf_fp32"])
    print(f"\nvs HF float32: ours bf16 torch_varlen worst cosine {min(ours):.7f}, HF bf16 sdpa {min(hf):.7f}")
    assert all(a >= b - 1e-5 for a, b in zip(ours, hf))
