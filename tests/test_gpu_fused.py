"""On a GPU: the fused kernels (rotary, GELU in the GEMM epilogue) equal the unfused reference."""

import pytest
import torch

from vitserve.models.rotary import rotary_qk, rotate_half_pairs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("head_width", [None, 80, 128])
@pytest.mark.parametrize("heads,head_dim", [(16, 72), (16, 64), (4, 24)])
def test_fused_rotary_matches_reference(heads, head_dim, head_width):
    tokens = 1000
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(tokens, 3 * heads * head_dim, device="cuda", generator=generator).to(torch.bfloat16)
    angles = torch.rand(tokens, 1, head_dim // 2, device="cuda", generator=generator) * 100
    cos, sin = angles.cos(), angles.sin()
    if head_width is not None and head_width < head_dim:
        pytest.skip("narrower than the head")
    q, k, v = rotary_qk(qkv, cos, sin, heads, head_width)
    q_ref, k_ref, v_ref = qkv.view(tokens, 3, heads, head_dim).unbind(1)
    # Identical float32 arithmetic up to fused multiply-adds: at most one bf16 rounding step apart.
    for ours, reference in ((q, rotate_half_pairs(q_ref, cos, sin)), (k, rotate_half_pairs(k_ref, cos, sin))):
        torch.testing.assert_close(ours, reference, rtol=2 ** -7, atol=1e-3)
        assert (ours != reference).float().mean().item() < 0.01
    assert torch.equal(v, v_ref)
    if head_width is not None and head_width > head_dim:  # padded heads: zeros past head_dim in q, k and v
        for x in (q, k, v):
            assert x.stride(1) == head_width
            assert not x.as_strided((tokens, heads, head_width), x.stride())[..., head_dim:].any()


def test_fused_mlp_gelu_is_the_tanh_gelu():
    from vitserve.models.qwen3_vl.config import Qwen3VLVisionConfig
    from vitserve.models.qwen3_vl.model import MLP

    torch.manual_seed(0)
    mlp = MLP(Qwen3VLVisionConfig(hidden_size=1152, intermediate_size=4304, num_heads=16)).cuda().bfloat16()
    x = torch.randn(784, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fused = mlp(x)
        reference = mlp.linear_fc2(torch.nn.functional.gelu(mlp.linear_fc1(x), approximate="tanh"))
    cosine = torch.nn.functional.cosine_similarity(fused.double().flatten(), reference.double().flatten(), dim=0)
    assert cosine.item() > 0.99999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_add_layer_norm_matches_unfused(dtype):
    from vitserve.models.add_norm import add_layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(1152, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    x = 4 * torch.randn(1000, 1152, device="cuda", dtype=dtype)
    branch = torch.randn(1000, 1152, device="cuda", dtype=dtype)
    with torch.inference_mode():
        total, normed = add_layer_norm(x, branch, norm)
        reference_total = x + branch
        reference = norm(reference_total)
    assert torch.equal(total, reference_total)
    tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(normed, reference, rtol=tolerance, atol=tolerance)
