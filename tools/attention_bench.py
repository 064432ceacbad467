"""Time segment attention on the windows the workloads produce (GPU): torch's varlen
FlashAttention-2 (with the true max_seqlen and with the budget, as a captured graph must
pass it), the Triton segment kernel under several tile configs, and dense SDPA where the
segments are equal (an upper bound). Each variant runs as a CUDA graph of 20 calls, so
launch overhead is excluded; TFLOP/s counts useful work at the true head dim.

    python tools/attention_bench.py [--head-dim 72] [--heads 16]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

from vitserve.models.segment_attention import KernelConfig, pad_heads, segment_attention

# name -> (segment lengths, budget the window would be padded to in a graph)
WINDOWS = {
    "single-448": ([784], 1024),
    "8x448": ([784] * 8, 6656),
    "20x336": ([484] * 20, 10240),
    "arena": ([4096, 1764, 784, 400, 256, 784, 400], 8704),
    "2x4096": ([4096, 4096], 8192),
}
CONFIGS = [KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 4), KernelConfig(64, 32, 4, 3),
           KernelConfig(64, 128, 4, 3), KernelConfig(128, 64, 4, 3), KernelConfig(128, 64, 8, 3)]


def graph_ms(fn, calls: int = 20, replays: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / (calls * replays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, (lengths, budget) in WINDOWS.items():
        padded = lengths + ([budget - sum(lengths)] if budget > sum(lengths) else [])
        tokens = sum(padded)
        q, k, v = (pad_heads(torch.randn(tokens, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16))
                   for _ in range(3))  # heads laid out as the Triton kernel reads them; FlashAttention takes the views
        cu = torch.zeros(len(padded) + 2, dtype=torch.int32, device="cuda")  # one spare empty slot, as graphs have
        cu[1:len(padded) + 1] = torch.tensor(padded, device="cuda").cumsum(0)
        cu[-1] = tokens
        flops = 4 * sum(n * n for n in lengths) * args.heads * args.head_dim
        row = results.setdefault(name, {})
        reference = varlen_attn(q, k, v, cu, cu, max(padded), max(padded))
        row["fa2 true max"] = graph_ms(lambda: varlen_attn(q, k, v, cu, cu, max(padded), max(padded)))
        row["fa2 budget max"] = graph_ms(lambda: varlen_attn(q, k, v, cu, cu, budget, budget))
        segments = SimpleNamespace(cu_seqlens=cu)
        for config in CONFIGS:
            out = segment_attention(q, k, v, segments, config)
            error = (out[:sum(lengths)].float() - reference[:sum(lengths)].float()).abs().max().item()
            if error > 5e-2:
                raise SystemExit(f"{name} {config}: max error {error} against FlashAttention")
            label = f"triton {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"
            row[label] = graph_ms(lambda: segment_attention(q, k, v, segments, config))
        if len(set(lengths)) == 1:
            dense = [x[:sum(lengths)].contiguous().view(len(lengths), lengths[0], args.heads, args.head_dim)
                     .transpose(1, 2) for x in (q, k, v)]
            row["sdpa dense"] = graph_ms(lambda: F.scaled_dot_product_attention(*dense))
        print(f"\n{name}: {len(lengths)} segments, {sum(lengths)} tokens in a {budget}-token window")
        for label, ms in row.items():
            print(f"  {label:28s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.0f} TFLOP/s")
    labels = [label for label in next(iter(results.values())) if label.startswith("triton")]
    best = min(labels, key=lambda label: sum(results[w][label] / results[w]["fa2 budget max"] for w in results))
    print(f"\nbest triton config over all windows (time relative to fa2 with the budget): {best}")
    for name, row in results.items():
        print(f"  {name:12s} {row['fa2 budget max'] / row[best]:.2f}x faster than fa2 budget, "
              f"{row['fa2 true max'] / row[best]:.2f}x than fa2 true max")


if __name__ == "__main__":
    main()
