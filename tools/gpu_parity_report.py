"""GPU diagnostics for the vision tower: parity against Hugging Face in bf16 and fp32, per item and
output, for each attention backend, plus eager latency of one 448x448 image.

    python tools/gpu_parity_report.py [--preset random:qwen3-vl-8b]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

from vitserve.models import load_model

GRIDS = [(1, 28, 28), (1, 64, 64), (1, 20, 36), (1, 16, 16), (4, 16, 16), (2, 28, 20)]


def hf_tower(model, dtype):
    config = model.config.to_dict()
    config.pop("rope_theta")
    with torch.device("cuda"):
        hf = Qwen3VLVisionModel._from_config(Qwen3VLVisionConfig(**config), attn_implementation="sdpa", dtype=dtype)
    hf.load_state_dict(model.state_dict())
    assert hf.rotary_pos_emb.inv_freq.dtype == torch.float32
    return hf.eval()


def outputs_of(out) -> list[torch.Tensor]:
    if hasattr(out, "pooler_output"):
        return [out.pooler_output, *out.deepstack_features]
    return [out.embeddings, *out.deepstack]


def worst_per_output(a_outputs, b_outputs) -> list[float]:
    """Worst per-item cosine for each output (merger, deepstack...)."""
    worst = []
    for a, b in zip(a_outputs, b_outputs, strict=True):
        start, cosines = 0, []
        for t, h, w in GRIDS:
            rows = t * h * w // 4
            x, y = a[start:start + rows].double().flatten(), b[start:start + rows].double().flatten()
            cosines.append(torch.nn.functional.cosine_similarity(x, y, dim=0).item())
            start += rows
        worst.append(min(cosines))
    return worst


def timed(fn, repeats=20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="random:qwen3-vl-8b")
    parser.add_argument("--plain-init", action="store_true",
                        help="experiment: unit norms and zero biases (Hugging Face's own initialisation)")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    grid_thw = torch.tensor(GRIDS)
    tokens = int(grid_thw.prod(-1).sum())
    pixels = torch.rand(tokens, 1536, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1

    results = {}
    ours32 = load_model(args.preset, device="cuda", dtype=torch.float32)
    if args.plain_init:
        with torch.no_grad():
            for name, param in ours32.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
    results["ours fp32 sdpa"] = outputs_of(ours32.encode_patches(pixels, grid_thw))
    hf32 = hf_tower(ours32, torch.float32)
    with torch.inference_mode():
        results["hf fp32 sdpa"] = outputs_of(hf32(pixels, grid_thw=grid_thw.cuda()))
    del hf32
    ours16 = load_model(args.preset, device="cuda", dtype=torch.bfloat16)
    ours16.load_state_dict(ours32.state_dict())
    hf16 = hf_tower(ours16, torch.bfloat16)
    with torch.inference_mode():
        results["hf bf16 sdpa"] = outputs_of(hf16(pixels.bfloat16(), grid_thw=grid_thw.cuda()))
    for backend in ("torch_varlen", "sdpa"):
        ours16.select_attention(backend)
        results[f"ours bf16 {backend}"] = outputs_of(ours16.encode_patches(pixels, grid_thw))

    pairs = [("ours fp32 sdpa", "hf fp32 sdpa"), ("hf bf16 sdpa", "hf fp32 sdpa"),
             ("ours bf16 torch_varlen", "hf fp32 sdpa"), ("ours bf16 sdpa", "hf fp32 sdpa"),
             ("ours bf16 torch_varlen", "hf bf16 sdpa"), ("ours bf16 sdpa", "hf bf16 sdpa")]
    print(f"worst per-item cosine per output (merger, deepstack...), {args.preset}, items {GRIDS}")
    for a, b in pairs:
        print(f"  {a:>24} vs {b:<14}: " + " ".join(f"{c:.6f}" for c in worst_per_output(results[a], results[b])))
    scale = [o.float().abs().max().item() for o in results["hf fp32 sdpa"]]
    print("  output max |x| (fp32):", " ".join(f"{s:.1f}" for s in scale))

    if args.skip_timing:
        return
    one = torch.rand(784, 1536, device="cuda") * 2 - 1
    one_grid = torch.tensor([[1, 28, 28]])
    for backend in ("torch_varlen", "sdpa"):
        ours16.select_attention(backend)
        print(f"eager 448x448 ours bf16 {backend}: {timed(lambda: ours16.encode_patches(one, one_grid)):.2f} ms")
    with torch.inference_mode():
        print(f"eager 448x448 hf bf16 sdpa: {timed(lambda: hf16(one.bfloat16(), grid_thw=one_grid.cuda())):.2f} ms")
    ours16.select_attention("torch_varlen")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours16.encode_patches(one, one_grid)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
