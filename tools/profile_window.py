"""Profile one padded window's forward (the kernels a graph replays), grouped by kernel.

    python tools/profile_window.py [--budget 1024] [--side 28] [--items 1]
"""

from __future__ import annotations

import argparse

import torch

from vitserve.models import load_model
from vitserve.workers import ModelRunner, WindowConfig
from vitserve.workers.packing import Window


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="random:qwen3-vl-8b")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--side", type=int, default=28, help="one image of side x side patches")
    parser.add_argument("--items", type=int, default=1, help="images in the window")
    parser.add_argument("--attention", help="attention backend (default: the best available)")
    args = parser.parse_args()
    model = load_model(args.preset, device="cuda", attention=args.attention)
    runner = ModelRunner(model, WindowConfig(budgets=(args.budget,), graphs=False))
    grids = [(1, args.side, args.side)] * args.items
    tokens = args.items * args.side**2
    pixels = torch.rand(tokens, 1536, device="cuda")
    window = Window(items=list(range(args.items)), tokens=tokens, sequences=args.items, budget=args.budget)
    slots = runner.capacities.fitting_slots(args.items)
    offsets = [i * args.side**2 for i in range(args.items)]
    with torch.inference_mode():
        for _ in range(3):
            runner.window.stage(window, grids, pixels, offsets)
            runner.window.forward(args.budget, slots)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.window.forward(args.budget, slots)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"budget {args.budget}, {args.items} x {args.side}x{args.side} = {tokens} real tokens, {model.attention_backend}: GPU time {total / 1e3:.3f} ms over "
          f"{sum(e.count for e in events)} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:18]:
        print(f"  {e.self_device_time_total / 1e3:8.3f} ms  {e.count:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
