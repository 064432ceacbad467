"""The policy comparison of `vitserve bench --compare-policies` on the CPU: one engine plays the
same arrivals through every policy, and every arrival ends exactly once under each."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vitserve import Engine, EngineConfig
from vitserve.bench.load import Job, jobs_of
from vitserve.bench.policies import compare_policies, policy_table, wilson_upper
from vitserve.bench.workloads import make_jobs
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
            report = await compare_policies(engine, jobs_of(requests, 5000.0), load=0.5, seconds=1.0,
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


def test_mixed_slo_jobs_carry_their_class_deadline_and_priority():
    jobs = make_jobs("mixed-slo", 40, deadline_ms=123.0)
    kinds = {job.kind for job in jobs}
    assert kinds == {"interactive", "batch"}
    for job in jobs:
        if job.kind == "interactive":
            assert (len(job.items), job.items[0].shape, job.deadline_ms) == (1, (448, 448, 3), 100.0)
        else:
            assert (len(job.items), job.items[0].shape, job.deadline_ms) == (20, (336, 336, 3), 10_000.0)
    urgent = {job.kind: job.priority for job in jobs}
    assert urgent["interactive"] < urgent["batch"]  # lower priorities are served first
    assert sum(job.kind == "interactive" for job in jobs) == 28  # 70 % of 40, exactly
    assert all(job.deadline_ms == 123.0 and not job.kind for job in make_jobs("single-448", 3, deadline_ms=123.0))


def test_classes_are_counted_apart_under_every_policy():
    rng = np.random.default_rng(1)
    jobs = [Job([rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)], 2000.0, 0, "interactive") for _ in range(3)]
    jobs.append(Job([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)], 20_000.0, 1, "batch"))

    async def run() -> dict:
        async with Engine(EngineConfig(window=WindowConfig(min_budget=64, max_budget=1024))) as engine:
            return await compare_policies(engine, jobs, load=0.5, seconds=1.0, policies=POLICIES, max_delay_ms=2.0,
                                          rounds=1, saturation_requests=20)

    report = asyncio.run(run())
    for row in report["policies"]:
        classes = row["classes"]
        assert set(classes) == {"interactive", "batch"}
        assert sum(part["sent"] for part in classes.values()) == row["sent"]
        assert classes["batch"]["goodput_rps"] > 0 and classes["interactive"]["goodput_rps"] > 0
        assert classes["batch"]["images_per_s"] >= 4 * classes["batch"]["goodput_rps"] * 0.99
    assert "interactive" in policy_table(report)
