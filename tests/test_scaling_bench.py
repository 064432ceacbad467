"""`vitserve bench --scaling` end to end on the CPU (tiny model, two CPU workers): the one-device and
the two-device engine take turns, every slice is reported, and a worker killed under load costs no
request. (Its figures are for machines with several GPUs; here only what the bench does is checked.)"""

from __future__ import annotations

import json

import pytest

from vitserve.bench.scaling_bench import run_scaling_bench, scaling_table, write_scaling

BUDGETS = ["--min-budget", "64", "--max-budget", "256"]


def test_one_device_and_two_take_turns_and_a_killed_worker_costs_no_request(tmp_path):
    rounds = 2
    result = run_scaling_bench("random:tiny", ["cpu", "cpu"], ["small-mix"], concurrency=4,
                               serve_arguments=BUDGETS, rounds=rounds, slice_s=0.3)
    (row,) = result["rows"]
    one, two = row["devices_1"], row["devices_2"]
    assert row["workload"] == "small-mix" and one["errors"] == {} and two["errors"] == {}
    assert len(one["slices"]) == len(two["slices"]) == rounds and all(rate > 0 for rate in one["slices"] + two["slices"])
    assert row["scaling"] == pytest.approx(two["images_per_s"] / one["images_per_s"])
    assert one["requests"] >= rounds * 2 * 4 and two["requests"] >= rounds * 2 * 8  # outstanding: 4 per device
    kill = result["kill_one"]
    assert kill["errors"] == {} and kill["completed"] == kill["requests"] > 0 and kill["worker_back_s"] > 0
    assert "small-mix" in scaling_table(result) and "a worker killed under load" in scaling_table(result)
    paths = write_scaling(result, tmp_path)
    assert {".json", ".txt"} <= {path.suffix for path in paths}
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"][0]["scaling"] == row["scaling"]


def test_scaling_needs_two_devices():
    with pytest.raises(ValueError, match="two or more"):
        run_scaling_bench("random:tiny", ["cpu"], ["small-mix"], 4, BUDGETS)
