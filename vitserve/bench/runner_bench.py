"""`vitserve bench`: the named workloads through every way a user could run the tower, in one run.

Methods: Hugging Face `Qwen3VLVisionModel` eager (SDPA) on the same weights, the same under
`torch.compile`, vitserve eager (`encode_patches`), and vitserve's runner with budget graphs.
Latency is per request, one at a time, synchronised; saturation throughput feeds many requests
at once. Inputs are preprocessed on the device before timing: the encoder is what is measured.
vitserve-graphs also copies every output to pinned host memory (the engine's path to shared
memory); the other methods leave their outputs on the GPU.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from vitserve.models import load_model
from vitserve.preprocess import preprocess_batch
from vitserve.workers import ModelRunner, RunnerStats, WindowConfig

from .flops import tower_flops
from .workloads import make_requests

log = logging.getLogger(__name__)

SATURATION_TOKENS = 32768  # patch tokens fed at once when measuring throughput


@dataclass
class Row:
    workload: str
    method: str
    mean_ms: float
    p50_ms: float
    p99_ms: float
    images_per_s: float
    tflops: float  # useful FLOPs per second at saturation / 1e12
    floor_ms: float  # mean useful FLOPs of a request at the measured matmul rate


# pixel_values (tokens, patch_dim) and grid_thw (items, 3) on the device as the HF tower takes it (hf_grid_thw),
# and the grids as a host list
Request = tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]


def matmul_rate(device: torch.device) -> float:
    """Measured dense bf16 matmul FLOP/s (8192^3), the reference for the compute floor."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - began)


def hf_twin(model, compile_model: bool = False):
    """Hugging Face's tower of the model's family with our weights (rotary frequencies kept float32,
    as from_pretrained does). It takes grids as `hf_grid_thw` gives them."""
    import transformers

    if model.model_type.startswith("kimi"):
        from .kimi_twin import kimi_twin

        twin = kimi_twin(model)
        return torch.compile(twin, dynamic=True) if compile_model else twin
    config = model.config.to_dict()
    config.pop("rope_theta")
    if model.model_type.startswith("glm"):
        config_class, tower_class = transformers.Glm4vVisionConfig, transformers.Glm4vVisionModel
    elif model.model_type.startswith("qwen3_5"):  # Qwen3.5's tower: Qwen3-VL's without deepstack
        config.pop("deepstack_visual_indexes")
        config_class, tower_class = transformers.Qwen3_5VisionConfig, transformers.Qwen3_5VisionModel
    else:
        config_class, tower_class = transformers.Qwen3VLVisionConfig, transformers.Qwen3VLVisionModel
    weight = next(model.parameters())
    with torch.device(weight.device):
        hf = tower_class._from_config(config_class(**config), attn_implementation="sdpa", dtype=weight.dtype)
    hf.load_state_dict(model.state_dict())
    hf.eval()
    return torch.compile(hf, dynamic=True) if compile_model else hf


def hf_grid_thw(model, grid_thw: torch.Tensor) -> torch.Tensor:
    """The grids as the HF tower of the model's family takes them: GLM-4.xV's model splits a video into
    one image per temporal patch before its tower, Kimi K2.5's processor into chunks of up to 4 frames
    (the rows are in that order already)."""
    if model.model_type.startswith("kimi"):
        pool = model.geometry.temporal_pool
        chunks = [(min(pool, t - start), h, w) for t, h, w in grid_thw.tolist() for start in range(0, t, pool)]
        return torch.tensor(chunks, dtype=grid_thw.dtype).reshape(-1, 3)
    if not model.model_type.startswith("glm"):
        return grid_thw
    frames = grid_thw.clone()
    frames[:, 0] = 1
    return frames.repeat_interleave(grid_thw[:, 0], dim=0)  # (temporal patches, 3)


def time_requests(run: Callable[[Request], None], requests: list[Request], warmup: int) -> list[float]:
    for request in requests[:warmup]:
        run(request)
    torch.cuda.synchronize()
    latencies = []
    for request in requests:
        began = time.perf_counter()
        run(request)
        torch.cuda.synchronize()
        latencies.append((time.perf_counter() - began) * 1e3)
    return latencies


def saturation_batches(requests: list[Request]) -> list[Request]:
    """Requests concatenated into batches of about SATURATION_TOKENS patch tokens."""
    batches, current = [], []
    for request in requests:
        current.append(request)
        if sum(r[0].shape[0] for r in current) >= SATURATION_TOKENS:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return [(torch.cat([r[0] for r in b]), torch.cat([r[1] for r in b]), [g for r in b for g in r[2]])
            for b in batches]


def time_saturation(run: Callable[[Request], None], batches: list[Request]) -> float:
    run(batches[0])
    torch.cuda.synchronize()
    began = time.perf_counter()
    for batch in batches:
        run(batch)
    torch.cuda.synchronize()
    return time.perf_counter() - began


METHODS = ("hf-eager", "hf-compile", "vitserve-eager", "vitserve-graphs")


def run_bench(model_source: str, workloads: list[str], requests_per_workload: int,
              methods_wanted: tuple[str, ...] = METHODS, window: WindowConfig | None = None, warmup: int = 3,
              attention: str | None = None) -> dict:
    device = torch.device("cuda")
    model = load_model(model_source, device=device, dtype=torch.bfloat16, attention=attention)
    runner = ModelRunner(model, window or WindowConfig())
    capture = runner.capture()
    rate = matmul_rate(device)
    log.info("bf16 matmul rate %.0f TFLOP/s", rate / 1e12)

    methods: dict[str, Callable[[Request], None]] = {}
    notes: dict[str, str] = {}
    if "hf-eager" in methods_wanted:
        hf = hf_twin(model)
        methods["hf-eager"] = lambda r: hf(r[0].to(torch.bfloat16), grid_thw=r[1])
    if "hf-compile" in methods_wanted:
        compiled = hf_twin(model, compile_model=True)
        methods["hf-compile"] = lambda r: compiled(r[0].to(torch.bfloat16), grid_thw=r[1])
    if "vitserve-eager" in methods_wanted:
        methods["vitserve-eager"] = lambda r: model.encode_patches(r[0], r[2])
    if "vitserve-graphs" in methods_wanted:
        methods["vitserve-graphs"] = lambda r: runner.encode(r[0], r[2])

    rows: list[Row] = []
    stats = {}
    for name in workloads:
        requests = []
        for items in make_requests(name, requests_per_workload):
            patches = preprocess_batch(items, model.preprocess, device=device)
            grids = [tuple(g) for g in patches.grid_thw.tolist()]
            requests.append((patches.pixel_values, hf_grid_thw(model, patches.grid_thw).to(device), grids))
        grids = [r[2] for r in requests]
        flops = [tower_flops(model.config, g) for g in grids]
        images = sum(len(g) for g in grids)
        batches = saturation_batches(requests)
        for method, run in list(methods.items()):
            try:
                with torch.inference_mode():
                    runner.stats = RunnerStats()
                    latencies = time_requests(run, requests, warmup)
                    seconds = time_saturation(run, batches)
            except Exception as err:  # report, do not hide: torch.compile of HF often fails
                notes[method] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                log.warning("%s on %s failed: %s", method, name, notes[method])
                methods.pop(method)
                continue
            if method == "vitserve-graphs":
                stats[name] = runner.stats.summary()
            quantiles = statistics.quantiles(latencies, n=100)
            rows.append(Row(name, method, statistics.fmean(latencies), statistics.median(latencies), quantiles[98],
                            images / seconds, sum(flops) / seconds / 1e12, statistics.fmean(flops) / rate * 1e3))
            log.info("%s %s: p50 %.2f ms, %.1f images/s", name, method, rows[-1].p50_ms, rows[-1].images_per_s)
    return {
        "model": model_source,
        "attention": model.attention_backend,
        "device": torch.cuda.get_device_name(device),
        "matmul_tflops": rate / 1e12,
        "capture": {"graphs": len(capture.keys), "seconds": capture.seconds,
                    "graph_mib": capture.graph_bytes / 2**20, "buffer_mib": capture.buffer_bytes / 2**20},
        "budgets": list(runner.capacities.budgets),
        "rows": [asdict(r) for r in rows],
        "failures": notes,
        "graph_stats": stats,
    }
