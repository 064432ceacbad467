"""Probe: capture cost, per-budget replay times, single-448 latency, and the cost of empty
attention segments in FlashAttention's varlen grid (8B-class tower, bf16)."""

from __future__ import annotations

import time

import torch
from torch.nn.attention.varlen import varlen_attn

from vitserve.models import load_model
from vitserve.workers import ModelRunner, WindowConfig
from vitserve.workers.cost_model import time_ms


def attention_grid_cost() -> None:
    heads, dim = 16, 72
    for real, slots, max_seqlen in [([784] * 5, 5, 784), ([784] * 5, 129, 4096), ([784] * 5, 129, 8192),
                                    ([4096, 4096], 2, 4096), ([4096, 4096], 129, 8192), ([256] * 32, 129, 8192),
                                    ([256] * 32, 32, 256)]:
        total = sum(real)
        q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bounds = [0]
        for n in real:
            bounds.append(bounds[-1] + n)
        bounds += [total] * (slots - len(real))
        cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        ms = time_ms(lambda: varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen), torch.device("cuda"), runs=20)
        flops = sum(4 * n * n * dim * heads for n in real)
        print(f"varlen segments {len(real)}x{real[0]} slots {slots} max_seqlen {max_seqlen}: {ms*1e3:.0f} us, "
              f"{flops / ms / 1e9:.0f} TFLOP/s")


def main() -> None:
    attention_grid_cost()
    model = load_model("random:qwen3-vl-8b", device="cuda")
    runner = ModelRunner(model, WindowConfig(min_budget=256, max_budget=8192))
    report = runner.capture(progress=False)
    print(f"capture: {len(report.keys)} graphs in {report.seconds:.1f} s, graphs {report.graph_bytes/2**20:.0f} MiB, "
          f"buffers {report.buffer_bytes/2**20:.0f} MiB, capacities {runner.capacities}")
    cost = runner.cost
    print(f"attention {cost.attention_ms_per_token2 * 1e6:.3f} ms per million squared tokens")
    print("replay base ms per (budget, slots):", {k: round(v, 3) for k, v in cost.padded_base_ms.items()})
    print("eager base ms by tokens:", [(t, round(v, 2)) for t, v in cost.eager_base_points])
    one = torch.rand(784, 1536, device="cuda") * 2 - 1
    grid = [(1, 28, 28)]
    print(f"single-448 runner.encode: {time_ms(lambda: runner.encode(one, grid), torch.device('cuda'), runs=20):.3f} ms; "
          f"replay predicted {cost.padded_ms((1024, 2), 784**2 + 240**2):.3f} ms; eager {time_ms(lambda: model.encode_patches(one, grid), torch.device('cuda'), runs=10):.2f} ms")
    # Host time of one encode call, to see staging overhead.
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(20):
        runner.encode(one, grid, wait=False)
    host = (time.perf_counter() - began) / 20 * 1e3
    torch.cuda.synchronize()
    print(f"single-448 host time per encode (no wait): {host:.3f} ms")
    print(runner.stats.summary())


if __name__ == "__main__":
    main()
