"""On a GPU: what a worker does per window never stalls it once it is warm.

- The host never waits for the device: the worker preprocesses window N+1 and queues its forward
  while window N runs; any call that synchronises (a tensor made from a Python list on the device,
  `.item()`, a copy to or from pageable memory) makes the host wait for window N instead, and the
  device then idles while the host catches up. torch's sync debug mode turns each such call into
  an error.
- No kernel is compiled: Triton compiles a kernel anew for each value of a constexpr and for
  integer arguments equal to 1 or divisible by 16, about a second each, the first time a window
  needs one. Eager windows of any segment count and token count must find theirs compiled by the
  warm-up (graph capture and calibration).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:qwen3-vl-8b"


@pytest.fixture(scope="module")
def runner():
    from vitserve.models import load_model
    from vitserve.workers import ModelRunner, WindowConfig

    model = load_model(MODEL, device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(model, WindowConfig(budgets=(1024, 4096), max_items=64, max_sequences=64))
    runner.capture(progress=False)  # graphs and the cost model, as a worker's warm-up
    return runner


def images(sides, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, device="cuda", generator=generator) for h, w in sides]


def test_windows_queue_without_waiting_for_the_device(runner, monkeypatch):
    from vitserve.preprocess import PreprocessConfig, preprocess_batch

    # no eager prediction: a window that fits a budget replays its graph
    monkeypatch.setattr(runner.cost, "eager_base_points", [])

    config = PreprocessConfig()
    items = images([(448, 448), (300, 500), (1280, 1280)])  # fits a graph; resized; more tokens than any budget
    first = preprocess_batch(items, config, device="cuda")
    grids = [tuple(g) for g in first.grid_thw.tolist()]
    geometry = runner.model.geometry
    rows = sum(geometry.item_rows(*grid) for grid in grids)
    outputs = [torch.empty(rows, 1 + geometry.num_deepstack, geometry.out_hidden_size, dtype=torch.bfloat16,
                           pin_memory=True) for _ in range(3)]  # (rows, 1 + deepstack, out_hidden)

    def window(out: torch.Tensor):
        patches = preprocess_batch(items, config, device="cuda")
        return runner.encode(patches.pixel_values, [tuple(g) for g in patches.grid_thw.tolist()], out=out, wait=False)

    window(outputs[0]).wait()  # the first: what is made once per shape or device (resize weights, constants)
    reference = outputs[0].clone()
    runs = {reason for _, reason, _, _ in runner.encode(first.pixel_values, grids, out=outputs[0]).runs}
    assert "graph" in runs and "too_many_tokens" in runs, runs

    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [window(out) for out in outputs]  # back to back, none waited for
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for result, out in zip(results, outputs):
        result.wait()
        assert torch.equal(out, reference)


def compiled_kernels() -> int:
    """Kernels Triton has compiled in this process for vitserve's kernels, all devices."""
    from vitserve.models import add_norm, rotary, segment_attention

    count = 0
    for kernel in (segment_attention._segment_attention_kernel, rotary._rotary_kernel,
                   add_norm._add_layer_norm_kernel):
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton keeps its compiled kernels elsewhere (JITFunction.device_caches)")
        count += sum(len(entry[0]) for entry in caches.values())
    return count


def test_eager_windows_compile_nothing_after_the_warm_up(runner, monkeypatch):
    monkeypatch.setattr(runner.cost, "padded_base_ms", {})  # no graph is measured: every window runs eagerly
    patch_dim = runner.model.geometry.patch_dim
    before = compiled_kernels()
    # Windows of 1 to 64 segments (each item one segment), with token counts divisible by 16 and
    # not (4 tokens per smallest item; 484 per 22x22 grid); and a two-frame video.
    windows = [[(1, 2, 2)] * count for count in [*range(1, 21), 31, 32, 33, 40, 63, 64]]
    windows += [[(1, 22, 22)], [(1, 22, 22)] * 3, [(2, 28, 28)]]
    for grids in windows:
        tokens = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(tokens, patch_dim, device="cuda")  # (tokens, patch_dim)
        result = runner.encode(pixels, grids)
        assert {reason for _, reason, _, _ in result.runs} == {"not_measured"}, result.runs
    assert compiled_kernels() == before, "a kernel was compiled for a window after the warm-up"
