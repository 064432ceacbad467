"""Attention backends: which one is picked, what an unavailable request says, and that the
portable SDPA backend's two paths (host lengths, device block-diagonal mask) agree and never
attend across segments. A `gpu` test compares torch's varlen kernel with SDPA on CUDA."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from vitserve.models import ATTENTION_BACKENDS, load_model, pack_grids
from vitserve.models.attention import available_backends, sdpa_attention, select_attention

CPU = torch.device("cpu")


@dataclass
class Segments:
    """Stand-in for the model's metadata: only what the attention backends read."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    segment_lengths: Sequence[int] | None


def segments(lengths: Sequence[int], *, host: bool, device="cpu", max_seqlen: int | None = None) -> Segments:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return Segments(cu.to(device), max(lengths) if max_seqlen is None else max_seqlen, tuple(lengths) if host else None)


def random_qkv(tokens: int, heads: int = 4, head_dim: int = 16, *, dtype=torch.float32, device="cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tokens, heads, head_dim, generator=generator, dtype=torch.float32).to(device, dtype)
                 for _ in range(3))


# -- selection ----------------------------------------------------------------------------------


def test_backend_names():
    assert ATTENTION_BACKENDS == ("flash_attn", "triton", "torch_varlen", "sdpa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_has_only_sdpa(dtype):
    assert available_backends(CPU, dtype) == ["sdpa"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_on_cpu_is_sdpa(dtype):
    name, fn = select_attention(None, CPU, dtype)
    assert name == "sdpa" and fn is sdpa_attention


def test_explicit_sdpa():
    name, fn = select_attention("sdpa", CPU, torch.float32)
    assert name == "sdpa" and fn is sdpa_attention


@pytest.mark.parametrize("requested", ["xformers", "SDPA", "flash-attn", ""])
def test_unknown_backend_lists_the_backends(requested):
    with pytest.raises(
        ValueError,
        match=re.escape(f"unknown attention backend {requested!r}; choose one of ['flash_attn', 'triton', 'torch_varlen', 'sdpa']"),
    ):
        select_attention(requested, CPU, torch.float32)


@pytest.mark.parametrize("requested", ["torch_varlen", "triton", "flash_attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backend_on_cpu_names_what_is_available(requested, dtype):
    with pytest.raises(ValueError) as info:
        select_attention(requested, CPU, dtype)
    message = str(info.value)
    assert f"attention backend {requested!r} is not available on cpu with {dtype}" in message
    assert "need CUDA and float16/bfloat16" in message
    assert message.endswith("available here: ['sdpa']")


@pytest.mark.parametrize("requested", ["torch_varlen", "triton", "flash_attn"])
def test_load_model_with_unavailable_backend(requested):
    with pytest.raises(ValueError, match=rf"attention backend '{requested}' is not available on cpu.*available here: \['sdpa'\]"):
        load_model("random:tiny", attention=requested)


def test_load_model_with_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; choose one of"):
        load_model("random:tiny", attention="nope")


@pytest.mark.parametrize("attention", [None, "sdpa"])
def test_load_model_records_backend(attention):
    model = load_model("random:tiny", attention=attention)
    assert model.attention_backend == "sdpa"
    assert model.requested_attention == attention


# -- the SDPA backend's two paths ------------------------------------------------------------------

LENGTH_CASES = [
    pytest.param([5, 17, 1, 9], id="plain"),
    pytest.param([16, 16, 12, 5, 0, 0], id="zero-length-at-end"),
    pytest.param([7, 0, 11, 0, 3, 0, 0, 0], id="zero-length-between"),
    pytest.param([33], id="one-segment"),
]


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_sdpa_host_lengths_match_device_mask(lengths):
    q, k, v = random_qkv(sum(lengths))
    host = sdpa_attention(q, k, v, segments(lengths, host=True))
    mask = sdpa_attention(q, k, v, segments(lengths, host=False))
    assert host.shape == mask.shape == q.shape
    torch.testing.assert_close(host, mask, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_sdpa_matches_per_segment_softmax_attention(lengths):
    """Both paths equal plain softmax(q k^T / sqrt(d)) v computed segment by segment in float64."""
    q, k, v = random_qkv(sum(lengths), dtype=torch.float64, seed=3)
    expected = torch.cat([
        torch.einsum("hqk,khd->qhd", torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) / qs.shape[-1] ** 0.5, -1), vs)
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ])
    for host in (True, False):
        torch.testing.assert_close(sdpa_attention(q, k, v, segments(lengths, host=host)), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("host", [True, False], ids=["host-lengths", "device-mask"])
def test_sdpa_never_attends_across_segments(host):
    lengths = [6, 10, 4, 8, 0, 0]
    bounds = [0, 6, 16, 20, 28]
    q, k, v = random_qkv(sum(lengths), seed=1)
    meta = segments(lengths, host=host)
    base = sdpa_attention(q, k, v, meta)
    for start, end in zip(bounds[:-1], bounds[1:]):
        noise = random_qkv(end - start, seed=100 + start)
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x, n in zip((q2, k2, v2), noise):
            x[start:end] += 3 * n
        out = sdpa_attention(q2, k2, v2, meta)
        assert not torch.allclose(out[start:end], base[start:end]), "the perturbed segment should change"
        outside = torch.ones(sum(lengths), dtype=torch.bool)
        outside[start:end] = False
        torch.testing.assert_close(out[outside], base[outside], atol=1e-7, rtol=0)


def test_model_metadata_segments_drive_both_paths():
    """Metadata from the model (padding segment plus empty ones at the end) gives the same
    boundaries as the host lengths, and the same attention on both paths."""
    model = load_model("random:tiny")
    grids = [(2, 4, 4), (1, 2, 6), (1, 6, 4)]
    packed = pack_grids(model, grids)
    padding, empty = 8, 3
    num_tokens = packed.num_tokens + padding
    num_sequences = packed.num_sequences + 1 + empty
    lengths = packed.segment_lengths + (padding,) + (0,) * empty
    max_seqlen = 64  # an upper bound, larger than any segment
    with_lengths = model.metadata(packed.layout, num_tokens, num_sequences, max_seqlen, lengths)
    without = model.metadata(packed.layout, num_tokens, num_sequences, max_seqlen)
    assert without.segment_lengths is None and with_lengths.segment_lengths == lengths
    assert torch.equal(with_lengths.cu_seqlens, without.cu_seqlens)
    assert with_lengths.cu_seqlens.dtype == torch.int32
    assert with_lengths.cu_seqlens.diff().tolist() == list(lengths)

    q, k, v = random_qkv(num_tokens, heads=model.config.num_heads, head_dim=model.config.head_dim, seed=5)
    torch.testing.assert_close(sdpa_attention(q, k, v, with_lengths), sdpa_attention(q, k, v, without), atol=1e-6, rtol=0)


def test_model_forward_same_on_both_paths_and_with_padding():
    """The whole tower: host lengths vs. device mask, padded window vs. `encode_patches`."""
    model = load_model("random:tiny")
    grids = [(1, 4, 4), (2, 2, 6)]
    packed = pack_grids(model, grids)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(packed.num_tokens, model.geometry.patch_dim, generator=generator)
    reference = model.encode_patches(pixel_values, grids)

    padding, empty = 8, 2  # padding rows: a multiple of merge² so the merged outputs line up
    padded = torch.cat([pixel_values, torch.randn(padding, model.geometry.patch_dim, generator=generator)])
    num_sequences = packed.num_sequences + 1 + empty
    lengths = packed.segment_lengths + (padding,) + (0,) * empty
    real = packed.num_tokens // model.geometry.merge_factor
    with torch.inference_mode():
        for segment_lengths in (lengths, None):
            meta = model.metadata(packed.layout, packed.num_tokens + padding, num_sequences, 100, segment_lengths)
            out = model(padded, meta)
            torch.testing.assert_close(out.embeddings[:real], reference.embeddings, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.deepstack[:, :real], reference.deepstack, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(out.embeddings).all()


# -- GPU: torch's varlen kernel against SDPA ---------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 72])  # 2B/4B towers: 64; 8B/32B/30B-A3B towers: 72
def test_torch_varlen_matches_sdpa_on_cuda(head_dim):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = torch.device("cuda")
    assert "torch_varlen" in available_backends(cuda, torch.bfloat16)
    name, varlen = select_attention("torch_varlen", cuda, torch.bfloat16)
    assert name == "torch_varlen"
    assert select_attention(None, cuda, torch.bfloat16)[0] in ("flash_attn", "triton", "torch_varlen")

    lengths = [784, 400, 256, 64]
    q, k, v = random_qkv(sum(lengths), heads=16, head_dim=head_dim, dtype=torch.bfloat16, device=cuda, seed=7)
    reference = sdpa_attention(q, k, v, segments(lengths, host=True, device=cuda))
    out = varlen(q, k, v, segments(lengths, host=False, device=cuda))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert _cosine(out, reference) >= 0.9999
    for os_, rs in zip(out.split(lengths), reference.split(lengths)):
        assert _cosine(os_, rs) >= 0.9999
    # The device-mask SDPA path agrees too.
    masked = sdpa_attention(q, k, v, segments(lengths, host=False, device=cuda))
    assert _cosine(masked, reference) >= 0.9999

    # Zero-length segments at the end and an oversized max_seqlen (as a captured graph's
    # static capacities produce) change nothing.
    padded = varlen(q, k, v, segments(lengths + [0, 0, 0], host=False, device=cuda, max_seqlen=4096))
    torch.testing.assert_close(padded, out, atol=0, rtol=0)
    oversized = varlen(q, k, v, segments(lengths, host=False, device=cuda, max_seqlen=8192))
    torch.testing.assert_close(oversized, out, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_model_defaults_to_a_varlen_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_model("random:tiny", device="cuda")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.attention_backend in ("flash_attn", "triton", "torch_varlen")
    grids = [(1, 8, 8), (2, 4, 6)]
    tokens = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(tokens, model.geometry.patch_dim, generator=torch.Generator().manual_seed(0))
    fast = model.encode_patches(pixel_values, grids)
    model.select_attention("sdpa")
    portable = model.encode_patches(pixel_values, grids)
    assert _cosine(fast.embeddings, portable.embeddings) >= 0.999
    assert _cosine(fast.deepstack, portable.deepstack) >= 0.999
