"""The policy comparison of `vitserve bench --compare-policies` on the CPU: one engine plays the
same arrivals through every policy, and every arrival ends exactly once under each."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vitserve import Engine, EngineConfig
from vitserve.bench.policies import compare_policies, policy_table, wilson_upper
from vitserve.workers import WindowConfig

POLICIES = ("deadline", "immediate", "max_delay")


def test_wilson_upper_bound_of_a_miss_rate():
    assert wilson_upper(0, 1000) == pytest.approx(1.959964**2 / (1000 + 1.959964**2))
    assert 0.001 < wilson_upper(1, 1000) < 0.006
    assert wilson_upper(5, 10) > 0.5
    assert wilson_upper(0, 0) == 1.0


def test_every_policy_sees_the_same_arrivals_on_one_engine():
    rng = np.random.default_rng(0)
    requests = [[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for _ in range(4)]

    async def run() -> tuple[dict, str, dict]:
        async with Engine(EngineConfig(window=WindowConfig(min_budget=64, max_budget=1024))) as engine:
            report = await compare_policies(engine, requests, load=0.5, seconds=1.0, deadline_ms=5000.0,
                                            policies=POLICIES, max_delay_ms=2.0, rounds=2, saturation_requests=40)
            return report, engine.scheduler.config.policy, engine.stats()

    report, policy_after, stats = asyncio.run(run())
    assert [row["label"] for row in report["policies"]] == list(POLICIES)
    for row in report["policies"]:
        assert row["sent"] == report["arrivals"] > 0
        assert row["completed"] + sum(row["errors"].values()) == row["sent"]
        assert len(row["miss_pct_by_round"]) == 2
        assert row["windows"] > 0 and row["items_per_window"] >= 1
        assert row["miss_pct"] <= row["miss_pct_upper95"]
    assert policy_after == "deadline"
    assert stats["requests_open"] == 0 and stats["queued_items"] == 0
    assert "max_delay" in policy_table(report)
