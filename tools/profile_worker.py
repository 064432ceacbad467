"""Where a worker's window time goes, against the cost model the scheduler predicts with.

Windows are formed first-come first-served from a named workload (as the scheduler forms them
under load) and run through an in-process `Worker`, the worker process's own code:

    python tools/profile_worker.py --workload arena-mix --windows 60

prints, summed over the windows: the cost model's prediction; the runner alone on patches
preprocessed beforehand; the worker one window at a time (preprocessing on the device, the
runner, the copy into shared memory); and the worker pipelined two windows deep, as it runs
in the engine. Each is shown as a ratio to the prediction.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque

import msgspec
import torch

from vitserve.bench.workloads import make_requests
from vitserve.engine.admission import admit
from vitserve.engine.outputs_layout import predictor
from vitserve.ipc.input_slabs import InputSlab, aligned, input_slab_name
from vitserve.ipc.worker_messages import Begin, MakeSlabs, MapInputs, RunWindow, WindowItem
from vitserve.ipc.slabs import slab_plan
from vitserve.preprocess import PreprocessConfig, preprocess_batch
from vitserve.workers import WindowConfig
from vitserve.launch import WorkerSpec
from vitserve.workers.worker import Worker, load_for_worker


def form_windows(items, capacities, count: int) -> list[list]:
    """First-come first-served windows of admitted items, as full as the capacities allow."""
    windows, current, tokens = [], [], 0
    for item in items:
        if current and (tokens + item.tokens > capacities.max_budget or len(current) == capacities.max_items):
            windows.append(current)
            current, tokens = [], 0
            if len(windows) == count:
                break
        current.append(item)
        tokens += item.tokens
    return windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:qwen3-vl-8b")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--workload", default="arena-mix")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--extra-budgets", default="784")
    args = parser.parse_args()
    extra = tuple(int(b) for b in args.extra_budgets.split(",")) if args.extra_budgets else ()
    spec = WorkerSpec(0, "ipc:///unused", args.model, args.device, None)
    preprocess = PreprocessConfig()
    begin = Begin(msgspec.to_builtins(WindowConfig(extra_budgets=extra)), msgspec.to_builtins(preprocess))
    # This process holds the input slab, as the engine does.
    worker = Worker(spec, os.getpid(), begin, load_for_worker(spec))
    while worker.warming:  # every graph captured, the cost model final
        worker.warm_step()
    caps = worker.runner.capacities
    predict = predictor(worker.cost_message(), caps)
    items = [admit(array, preprocess, 2 * caps.max_budget) for request in
             make_requests(args.workload, 4 * args.windows) for array in request]
    windows = form_windows(items, caps, args.windows)
    row_bytes = worker.row_shape[0] * worker.row_shape[1] * worker.runner.dtype.itemsize
    runs = 3  # output runs used in turn, each of the largest window's rows
    (slab, size), = plan = slab_plan("prof", caps.max_budget // caps.merge_factor * row_bytes, runs)
    made = worker.make_slabs(MakeSlabs(plan))
    if made.problem:
        raise SystemExit(f"the worker could not make its output slab: {made.problem}")

    # Every window's items in one input slab, adjacent, as a client's request lays them out.
    inputs = InputSlab.create(input_slab_name(os.getpid(), "prof", 0),
                              sum(aligned(item.array.nbytes) for window in windows for item in window))
    worker.inputs.map(MapInputs(inputs.name, inputs.fd, inputs.size))
    window_items, offset = [], 0
    for window in windows:
        window_items.append([])
        for item in window:
            inputs.array(offset, "uint8", item.array.shape, writable=True)[...] = item.array
            window_items[-1].append(WindowItem(item.kind, item.grid, inputs.name, offset, "uint8", item.array.shape))
            offset += aligned(item.array.nbytes)

    def message(index: int, window) -> RunWindow:
        return RunWindow(index, window_items[index], slab, index % runs * size // runs, size // runs)

    predicted = [predict(sum(i.tokens for i in w), sum(i.sequences for i in w),
                         sum(i.tokens ** 2 // i.sequences for i in w)) for w in windows]
    patches = [preprocess_batch([i.array for i in w], preprocess, device=worker.device) for w in windows]

    def sync() -> None:
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)

    def timed(run) -> float:
        sync()
        began = time.perf_counter()
        run()
        sync()
        return (time.perf_counter() - began) * 1e3

    for index, window in enumerate(windows[:3]):  # warm-up
        worker.start(message(index, window)).reply()
    runner_ms = sum(timed(lambda p=p: worker.runner.encode(p.pixel_values, p.grid_thw.tolist(), wait=True))
                    for p in patches)
    single_ms = sum(timed(lambda i=i, w=w: worker.start(message(i, w)).reply()) for i, w in enumerate(windows))

    def pipelined() -> None:
        running = deque()
        for index, window in enumerate(windows):
            if len(running) == 2:
                running.popleft().reply()
            running.append(worker.start(message(index, window)))
        while running:
            running.popleft().reply()

    pipelined_ms = timed(pipelined)
    model_ms = sum(predicted)
    tokens = sum(i.tokens for w in windows for i in w)
    print(f"{len(windows)} windows of {args.workload}, {tokens / len(windows):.0f} tokens and "
          f"{sum(map(len, windows)) / len(windows):.1f} items each")
    for label, ms in (("cost model", model_ms), ("runner, preprocessed", runner_ms),
                      ("worker, one at a time", single_ms), ("worker, pipelined", pipelined_ms)):
        print(f"  {label:<24} {ms / len(windows):8.2f} ms/window  {ms / model_ms:5.2f}x model")
    worker.close()
    inputs.close()


if __name__ == "__main__":
    main()
