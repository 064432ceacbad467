"""`vitserve bench --overhead` end to end on the CPU (tiny model, an already-processed 2x2 image):
every baseline and both engines are measured in one run, and the added latencies are the
differences the report names. (Its figures are for the GPU machine; speed is not checked here.)"""

from __future__ import annotations

import pytest

from vitserve.bench.overhead import as_dict, overhead_table, run_overhead
from vitserve.bench.overhead_baselines import make_item
from vitserve.workers import WindowConfig


def test_the_served_and_the_embedded_engine_are_measured_against_the_same_baselines():
    result = run_overhead("random:tiny", "cpu", WindowConfig(min_budget=64, max_budget=256), make_item(None, (2, 2)),
                          requests=40, concurrency=4, serve_arguments=["--min-budget", "64", "--max-budget", "256"], rounds=2)
    figures = as_dict(result)
    for name in ("raw_p50_ms", "runner_p50_ms", "engine_p50_ms", "embedded_p50_ms", "worker_mean_ms",
                 "raw_rps", "engine_rps", "embedded_rps"):
        assert figures[name] > 0, name
    assert result.worker_gpu_mean_ms == 0.0  # (the CPU records no device events)
    stages = result.embedded_stages_ms  # (means of one engine's clocks and its worker's)
    assert 0 < stages["in_worker"] <= stages["dispatch_to_reply"] <= stages["admission_to_result"]
    assert stages["admission_to_dispatch"] >= 0 and stages["device"] == 0.0
    assert result.added_p50_ms == pytest.approx(result.engine_p50_ms - result.raw_p50_ms - result.runner_p50_ms)
    assert result.embedded_added_p50_ms == pytest.approx(result.embedded_p50_ms - result.runner_p50_ms)
    assert result.rounds == 2
    table = overhead_table(result)
    assert "embedded" in table and "processed image, grid 1x2x2" in table and "admission to dispatch" in table
