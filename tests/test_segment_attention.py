"""The Triton segment-attention kernel: its tile-to-segment map, head-dim split and masking.

On the CPU the kernel runs under Triton's interpreter (float32, in a subprocess because the
interpreter is chosen when the kernel is defined); on CUDA (`gpu`) in bf16 against a float32
reference, inside a CUDA graph replayed with new segment boundaries, and in the 8B tower.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vitserve.models.rotary import rotary_qk
from vitserve.models.segment_attention import KernelConfig, pad_heads, padded_head_dim, segment_attention, split_head_dim

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Segment patterns: empty segments first, middle and last; segments shorter than a tile; a
# segment spanning several tiles that starts mid-tile; a single segment.
PATTERNS = [
    [5, 0, 130, 64, 1, 70, 0],
    [0, 33, 32, 31],
    [200],
    [17, 0, 0, 96, 3],
]


def reference(q, k, v, lengths):
    """Float32 SDPA per segment: (tokens, heads, head_dim)."""
    pieces = [F.scaled_dot_product_attention(*(x.float().transpose(0, 1) for x in parts)).transpose(0, 1)
              for parts in zip(*(x.split(lengths) for x in (q, k, v)))]
    return torch.cat(pieces)


def boundaries(lengths, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return SimpleNamespace(cu_seqlens=cu.to(device))


def random_qkv(tokens, heads, head_dim, dtype, device, seed):
    """q, k, v laid out with padded heads, as the kernel reads them."""
    generator = torch.Generator().manual_seed(seed)
    return [pad_heads(torch.randn(tokens, heads, head_dim, generator=generator).to(device, dtype)) for _ in range(3)]


def interpreter_errors() -> dict[str, float]:
    """Worst absolute error per case, run on the CPU (call with TRITON_INTERPRET=1 set)."""
    errors = {}
    for head_dim in (12, 16, 20, 64, 72):
        for index, lengths in enumerate(PATTERNS):
            q, k, v = random_qkv(sum(lengths), 2, head_dim, torch.float32, "cpu", seed=index)
            out = segment_attention(q, k, v, boundaries(lengths), KernelConfig(block_m=32, block_n=16))
            errors[f"d{head_dim}-p{index}"] = (out - reference(q, k, v, lengths)).abs().max().item()
    return errors


@pytest.mark.parametrize("head_dim, expected", [(8, (16, 0)), (16, (16, 0)), (20, (16, 16)), (64, (64, 0)),
                                                (72, (64, 16)), (80, (64, 16)), (96, (64, 32)), (112, (64, 64))])
def test_head_dim_split_covers_with_little_padding(head_dim, expected):
    assert split_head_dim(head_dim) == expected


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_kernel_under_the_interpreter_matches_sdpa():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errors) == 5 * len(PATTERNS)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: {errors[worst]}"


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(4, 2, 72),  # heads not padded
    lambda: torch.zeros(4, 2, 80)[..., 8:],  # padded, but the last head's padding is past the storage
    lambda: torch.zeros(4, 80, 2).transpose(1, 2)[..., :72],  # channels not contiguous
])
def test_rejects_unpadded_heads(make):
    q = make()
    good = pad_heads(torch.zeros(4, 2, 72))
    with pytest.raises(ValueError, match=r"segment_attention reads q heads 80 channels wide \(head_dim 72 padded\).*"
                                         r"rotary_qk\(\.\.\., head_width=80\) or pad_heads"):
        segment_attention(q, good, good, boundaries([4]))


def test_rotary_lays_out_padded_heads_on_cpu():
    tokens, heads, head_dim = 10, 3, 72
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=generator)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=generator)
    plain = rotary_qk(qkv, angles.cos(), angles.sin(), heads)
    padded = rotary_qk(qkv, angles.cos(), angles.sin(), heads, head_width=padded_head_dim(head_dim))
    for a, b in zip(plain, padded):
        assert torch.equal(a, b) and b.stride(1) == 80
        widened = b.as_strided((tokens, heads, 80), b.stride())
        assert torch.equal(widened[..., head_dim:], torch.zeros(tokens, heads, 8))
    with pytest.raises(ValueError, match="head_width 64 is narrower than head_dim 72"):
        rotary_qk(qkv, angles.cos(), angles.sin(), heads, head_width=64)


# -- GPU ------------------------------------------------------------------------------------------


def _cosine(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [16, 20, 64, 72, 80, 128])
def test_bf16_kernel_matches_float32_reference(head_dim):
    windows = PATTERNS + [[784, 240], [4096, 1764, 784, 400, 256, 0, 0], [441] * 20 + [180, 0]]
    for seed, lengths in enumerate(windows):
        q, k, v = random_qkv(sum(lengths), 16, head_dim, torch.bfloat16, "cuda", seed)
        out = segment_attention(q, k, v, boundaries(lengths, "cuda"))
        expected = reference(q, k, v, lengths)
        assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.isfinite().all()
        for got, want in zip(out.split(lengths), expected.split(lengths)):
            if want.numel():
                assert _cosine(got, want) >= 0.9999
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_captured_kernel_follows_new_boundaries():
    """One capture serves any boundaries with the same number of segments (a budget graph's case)."""
    tokens, heads, head_dim = 2048, 16, 72
    q, k, v = random_qkv(tokens, heads, head_dim, torch.bfloat16, "cuda", seed=3)
    assert q.stride(1) == 80
    cu = torch.zeros(9, dtype=torch.int32, device="cuda")
    windows = [[2048] + [0] * 7, [784, 784, 400, 80, 0, 0, 0, 0], [256] * 8, [1, 2, 3, 4, 5, 6, 7, 2020]]
    cu.copy_(boundaries(windows[0], "cuda").cu_seqlens)
    segments = SimpleNamespace(cu_seqlens=cu)
    segment_attention(q, k, v, segments)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = segment_attention(q, k, v, segments)
    for lengths in windows:
        cu.copy_(boundaries(lengths, "cuda").cu_seqlens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert out.isfinite().all()
        assert _cosine(out, reference(q, k, v, lengths)) >= 0.9999


@pytest.mark.gpu
@needs_cuda
def test_tower_with_triton_attention_matches_torch_varlen():
    from vitserve.models import load_model

    grids = [(1, 28, 28), (2, 16, 20), (1, 12, 40)]
    tokens = sum(t * h * w for t, h, w in grids)
    triton_model = load_model("random:qwen3-vl-8b", device="cuda", dtype=torch.bfloat16, attention="triton")
    pixel_values = torch.randn(tokens, triton_model.geometry.patch_dim, generator=torch.Generator().manual_seed(0))
    ours = triton_model.encode_patches(pixel_values, grids)
    triton_model.select_attention("torch_varlen")
    theirs = triton_model.encode_patches(pixel_values, grids)
    assert ours.embeddings.isfinite().all()
    assert _cosine(ours.embeddings, theirs.embeddings) >= 0.9999
    assert _cosine(ours.deepstack, theirs.deepstack) >= 0.9999


if __name__ == "__main__":  # the interpreter run of test_kernel_under_the_interpreter_matches_sdpa
    print(json.dumps(interpreter_errors()))
