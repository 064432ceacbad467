"""`vitserve bench --served` end to end on the CPU (tiny model): the runner and the served engine
take turns, and the report holds every slice, the restart figures and the files. (Its figures
are for the GPU machine; here only what the bench does is checked, never how fast.)"""

from __future__ import annotations

import json

import pytest

from vitserve.bench.served_bench import run_served_bench, served_table, write_served
from vitserve.workers import WindowConfig

BUDGETS = ["--min-budget", "64", "--max-budget", "256"]


def test_the_runner_and_the_server_take_turns_and_every_slice_is_reported(tmp_path):
    rounds = 2
    result = run_served_bench("random:tiny", "cpu", WindowConfig(min_budget=64, max_budget=256), ["small-mix"],
                              concurrency=4, serve_arguments=BUDGETS, rounds=rounds, slice_s=0.3)
    (row,) = result["rows"]
    assert row["workload"] == "small-mix" and row["errors"] == {}
    assert len(row["runner_slices"]) == rounds + 1 and len(row["served_slices"]) == rounds
    assert all(rate > 0 for rate in row["runner_slices"] + row["served_slices"])
    assert row["runner_images_per_s"] == pytest.approx(sum(row["runner_slices"]) / (rounds + 1))
    assert row["ratio"] == pytest.approx(row["images_per_s"] / row["runner_images_per_s"])
    assert row["ratio_batched"] == pytest.approx(row["images_per_s"] / row["runner_batched_images_per_s"])
    assert row["requests"] >= rounds * 2 * 4  # each slice: at least twice the requests outstanding
    # the served rate is over the slices' own time: between the slowest and the fastest slice
    assert min(row["served_slices"]) <= row["images_per_s"] * (1 + 1e-9)
    assert row["images_per_s"] <= max(row["served_slices"]) * (1 + 1e-9)
    assert row["items_per_window"] >= 1
    assert 0 < result["restart_serving_s"] <= result["restart_warm_s"]
    assert "small-mix" in served_table(result)
    paths = write_served(result, tmp_path)
    assert {".json", ".txt"} <= {path.suffix for path in paths}  # (and .png where matplotlib is installed)
    assert json.loads((tmp_path / "served.json").read_text())["rows"][0]["served_slices"] == row["served_slices"]
