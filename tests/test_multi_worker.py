"""Several CPU workers in one engine (`EngineConfig(devices=("cpu", "cpu"))`), with real worker
processes and the tiny model. Checked here:

- dispatch: under concurrent load every worker answers windows, and the per-worker counts (in
  process, and as `vitserve_worker_windows_total{worker}` on /metrics) add up to the windows sent;
- results: a two-worker engine gives the embeddings a one-worker engine gives, and the eager model's,
  for images of several sizes, a video and a mixed request;
- a worker killed under load: its windows are retried, every request succeeds, the engine stays
  ready on the other worker (whose process is untouched) while it restarts, and afterwards both serve;
- readiness: a stopped worker that does not answer its readiness probe makes it 1 of 2 workers
  ready, not 0: the engine stays ready and serves on the other, and both are ready once it resumes;
- without restarts (`worker_restarts=0`), a killed worker leaves the engine serving on the other.

Nothing here asserts how long anything takes: waits are bounded (generously, for a loaded 2-core
machine) only so that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from vitserve import Engine, EngineConfig
from vitserve.engine.http_endpoint import HttpEndpoint
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image, preprocess_video
from vitserve.workers import WindowConfig

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
WAIT_S = 120.0  # the bound on any wait: only a regression comes near it
# Sides that the tiny model's preprocessing all resizes to a 16×16 patch grid (its minimum pixels):
# 256 tokens each, so two such images fill a window of the 512-token budget exactly. Full windows
# leave at once, which makes how a burst spreads over the workers predictable (see test 1).
SAME_TOKEN_SIDES = (64, 96, 128, 200, 256)


def config(workers: int = 2, **changes) -> EngineConfig:
    settings = dict(devices=("cpu",) * workers, window=WindowConfig(min_budget=64, max_budget=512),
                    max_item_tokens=4096)
    return EngineConfig(**(settings | changes))


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny")


def image(side: int, seed: int, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, width or side, 3), dtype=np.uint8)


def video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def burst(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """`count` one-image requests of 256 tokens each (different pixels, different sides)."""
    return [[image(SAME_TOKEN_SIDES[i % len(SAME_TOKEN_SIDES)], seed + i)] for i in range(count)]


def eager(model, item: np.ndarray) -> torch.Tensor:
    """The eager model's embeddings of one image (H×W×3) or video (T×H×W×3)."""
    patches = (preprocess_video if item.ndim == 4 else preprocess_image)(item, model.preprocess)
    return model.encode_patches(patches.pixel_values, patches.grid_thw).embeddings


def check(result, items: list[np.ndarray], model) -> None:
    assert len(result.items) == len(items)
    for got, item in zip(result.items, items):
        torch.testing.assert_close(got.embeddings, eager(model, item), **TOLERANCE)


def served_by(ref) -> tuple[int, int]:
    """(worker, epoch) whose output slab holds an item's rows: each worker writes slabs of its own,
    named `vitserve-<pid>-w<worker>n<engine>-e<epoch>-<i>` (ipc/slabs.py slab_plan, engine/restarts.py)."""
    found = re.search(r"-w(\d+)n\d+-e(\d+)-\d+$", ref.slab)
    assert found, f"an output slab name that names no worker: {ref.slab!r}"
    return int(found.group(1)), int(found.group(2))


async def until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"waited {timeout_s:g} s for {what}"
        await asyncio.sleep(0.01)


async def health_when(engine: Engine, condition, what: str):
    """The engine's health once `condition(health)` holds, that very snapshot (asserting on a later one
    could see a state that came after)."""
    seen = []

    def check() -> bool:
        seen[:] = [engine.health()]
        return condition(seen[0])

    await until(check, what)
    return seen[0]


async def encode_all(engine: Engine, requests: list[list[np.ndarray]]) -> list:
    """Every request in flight at once (one asyncio.gather), bounded."""
    return await asyncio.wait_for(asyncio.gather(*(engine.encode(items) for items in requests)), WAIT_S)


def in_flight(engine: Engine, worker: int) -> int:
    """Windows the scheduler has sent `worker` that it has not answered."""
    return len(engine.scheduler.workers[worker].in_flight)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def scrape(engine: Engine, path: str) -> tuple[int, str]:
    """What `vitserve serve --http-port` answers on `path`, from the embedded engine's snapshot: the
    same endpoint, served from a thread while this loop takes the snapshot."""
    endpoint = HttpEndpoint("127.0.0.1", 0)
    endpoint.start(asyncio.get_running_loop(), engine.snapshot)
    try:
        return await asyncio.to_thread(http_get, endpoint.url + path)
    finally:
        endpoint.close()


def samples(text: str) -> dict[str, float]:
    def key(sample) -> str:  # name{label=value,...}
        labels = ",".join(f"{name}={value}" for name, value in sorted(sample.labels.items()))
        return sample.name + (f"{{{labels}}}" if labels else "")

    return {key(sample): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


# -- 1. dispatch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_a_burst_is_spread_over_every_worker_and_the_counts_add_up(model, workers):
    """24 requests of 256 tokens in flight at once are 12 full windows (two images each): the
    scheduler sends each to the worker predicted to finish it first, at most two in flight per
    worker (in_flight_per_worker), so every worker takes some of the first ones."""
    requests = burst(24)

    async def run() -> None:
        async with Engine(config(workers)) as engine:
            results = await encode_all(engine, requests)
            try:
                for result, items in zip(results, requests):
                    check(result, items, model)
                by_items = {served_by(ref)[0] for result in results for ref in result.refs}
            finally:
                for result in results:
                    result.release()
            totals = engine.run_counts.snapshot()
            sent = engine.stats()["windows_sent"]
            assert by_items == set(range(workers)), "every worker's slabs hold some of the results"
            assert set(totals.worker_windows) == set(range(workers))
            assert all(count > 0 for count in totals.worker_windows.values()), totals.worker_windows
            assert sum(totals.worker_windows.values()) == sent >= 12  # (probes are not windows)
            # Device time is measured with CUDA events (workers/running.py): a CPU worker reports none, so
            # its series is there but counts 0; only its presence is checked here.
            assert set(totals.worker_busy_ms) == set(range(workers))
            # The same counts on /metrics, one series per worker.
            status, text = await scrape(engine, "/metrics")
            assert status == 200
            metrics = samples(text)
            for worker in range(workers):
                assert metrics[f"vitserve_worker_windows_total{{worker={worker}}}"] == totals.worker_windows[worker]
                assert metrics[f"vitserve_worker_device_busy_seconds_total{{worker={worker}}}"] >= 0
            per_worker = [v for name, v in metrics.items() if name.startswith("vitserve_worker_windows_total{")]
            assert len(per_worker) == workers and sum(per_worker) == metrics["vitserve_windows_total"] == sent
            assert metrics["vitserve_workers_ready"] == workers and metrics["vitserve_ready"] == 1

    asyncio.run(run())


# -- 2. results equal one worker's -----------------------------------------------------------------


def test_two_workers_give_the_embeddings_of_one_worker_and_of_the_eager_model(model):
    """One worker encodes the requests one at a time; two workers get them all at once, so their
    windows are packed differently and spread over both. Same embeddings, within the tolerance."""
    requests = [
        [image(64, 1)],  # 256 tokens (the preprocessing's minimum)
        [image(300, 2)],  # 18×18 patches
        [image(400, 3)],  # 24×24 = 576 tokens: over the largest budget, run eagerly alone
        [image(96, 4, width=480)],  # not square
        [video(4, 112, 144, 5)],  # a video of 4 frames (2 temporal patches)
        [image(200, 6), video(4, 64, 96, 7), image(256, 8, width=320)],  # a mix in one request
    ] * 2  # twice over: more windows than two workers take at once

    async def one_worker() -> list[list[torch.Tensor]]:
        async with Engine(config(1)) as engine:
            copies = []
            for items in requests:
                with await asyncio.wait_for(engine.encode(items), WAIT_S) as result:
                    copies.append([item.embeddings.clone() for item in result.items])
            return copies

    async def two_workers() -> tuple[list[list[torch.Tensor]], set[int]]:
        async with Engine(config(2)) as engine:
            results = await encode_all(engine, requests)
            try:
                copies = [[item.embeddings.clone() for item in result.items] for result in results]
                used = {served_by(ref)[0] for result in results for ref in result.refs}
            finally:
                for result in results:
                    result.release()
            return copies, used

    async def run() -> tuple:
        return await one_worker(), await two_workers()

    alone, (shared, used) = asyncio.run(run())
    assert used == {0, 1}, "both workers ran some of the items (else this compares nothing)"
    bit_equal = True
    for items, one, two in zip(requests, alone, shared, strict=True):
        for item, a, b in zip(items, one, two, strict=True):
            expected = eager(model, item)
            assert a.shape == b.shape == expected.shape
            torch.testing.assert_close(b, a, **TOLERANCE)
            torch.testing.assert_close(b, expected, **TOLERANCE)
            bit_equal = bit_equal and torch.equal(a, b)
    # Bit-equal on a 2-core host, but not promised: windows are packed differently, and on a larger
    # host a lone CPU worker gets more threads than each of two (cpu_threads_per_worker shares the
    # cores), so its reductions may be split, and rounded, differently. The tolerance is the contract.
    print(f"two workers' embeddings bit-equal to one worker's: {bit_equal}")


# -- 3. a killed worker while the other serves -----------------------------------------------------


def test_a_worker_killed_under_load_is_restarted_while_the_other_serves(model):
    """The victim is stopped (SIGSTOP) before the load and killed once it holds windows: windows sent
    to a stopped process cannot have been answered, so its loss certainly costs windows, which must
    be retried. (Heartbeats are slowed so that the stop alone is not taken for a hang.)"""
    survivor, victim = 0, 1
    load = burst(24, seed=100)
    during = [image(128, 200)]
    after = burst(12, seed=300)

    async def run() -> None:
        async with Engine(config(worker_heartbeat_s=30.0)) as engine:
            survivor_pid, victim_pid = engine.health().worker_pids  # (in worker order while all run)
            os.kill(victim_pid, signal.SIGSTOP)
            try:
                running = [asyncio.ensure_future(engine.encode(items)) for items in load]
                await until(lambda: in_flight(engine, victim) > 0, "a window sent to the stopped worker")
            finally:
                os.kill(victim_pid, signal.SIGKILL)  # (also ends it if the wait failed)
            # The engine sees the loss: the victim restarts, the survivor serves, the engine is ready.
            health = await health_when(engine, lambda h: h.workers_ready == 1, "the loss to be noticed")
            assert health.ready and (health.workers_ready, health.workers) == (1, 2), health
            assert "no worker is up" not in health.detail
            assert health.worker_pids[0] == survivor_pid and victim_pid not in health.worker_pids
            # A request sent now, ahead of the load (lower priority numbers go first), succeeds. If the
            # victim is not back yet (no restart counted) only the survivor can have served it: in
            # practice it is not, as a restart starts a process and loads the model.
            with await asyncio.wait_for(engine.encode(during, priority=-1), WAIT_S) as result:
                check(result, during, model)
                if engine.stats()["worker_restarts"] == 0:
                    assert served_by(result.refs[0]) == (survivor, 0)
            results = await asyncio.wait_for(asyncio.gather(*running), WAIT_S)
            try:
                for result, items in zip(results, load):
                    check(result, items, model)
                    # nothing came from the victim's first epoch: it ran nothing before it died
                    assert all(served_by(ref) != (victim, 0) for ref in result.refs)
            finally:
                for result in results:
                    result.release()
            stats = engine.stats()
            assert stats["windows_retried"] >= 1 and stats["worker_hangs"] == 0
            await until(lambda: engine.stats()["worker_restarts"] == 1, "the restart")
            health = await health_when(engine, lambda h: h.workers_ready == 2, "both workers ready")
            assert health.ready and health.detail == ""
            assert health.worker_pids[0] == survivor_pid, "the survivor's process is untouched"
            assert health.worker_pids[1] not in (survivor_pid, victim_pid)
            # Both serve again: the restarted worker writes slabs of its new epoch.
            results = await encode_all(engine, after)
            try:
                for result, items in zip(results, after):
                    check(result, items, model)
                assert {served_by(ref) for result in results for ref in result.refs} == {(survivor, 0), (victim, 1)}
            finally:
                for result in results:
                    result.release()
            assert engine.stats()["worker_restarts"] == 1
            # Nothing is left held (a release reaches the engine a loop turn later).
            await until(lambda: engine.stats()["requests_open"] == engine.stats()["slots_leased"] == 0, "the releases")

    asyncio.run(run())


# -- 4. readiness with two workers -------------------------------------------------------------


def test_a_stopped_worker_is_unready_and_gets_no_windows_while_the_other_serves(model):
    """Heartbeats too slow to notice the stop and no window watchdog: the stopped worker is neither
    hung nor stuck, only unproven (engine/probes.py). The engine stays ready on the other worker, and
    once the stopped one is suspect the scheduler sends it nothing while the other can take windows;
    resumed, it is ready again with nothing restarted."""
    survivor, victim = 1, 0
    settings = dict(worker_heartbeat_s=30.0, readiness_probe_s=0.2, readiness_timeout_s=1.0, window_timeout_s=None)

    async def run() -> None:
        async with Engine(config(**settings)) as engine:
            await until(lambda: engine.stats()["probes_sent"] >= 2, "the first probes")
            pids = engine.health().worker_pids
            os.kill(pids[victim], signal.SIGSTOP)
            try:
                # (the very snapshot that names the stopped worker: an idle survivor answers its probes)
                health = await health_when(engine, lambda h: f"worker {victim} has not answered its readiness "
                                           "probe" in h.detail, "the stopped worker to be unready")
                assert health.ready and (health.workers_ready, health.workers) == (1, 2), health
                assert f"worker {victim} has not answered its readiness probe" in health.detail
                assert f"worker {survivor}" not in health.detail
                assert engine.stats()["workers_unproven"] == 1 and engine.stats()["workers_ready"] == 2
                status, text = await scrape(engine, "/readyz")
                assert (status, text) == (200, "ready: 1 of 2 workers up\n")
                await until(lambda: engine.scheduler.workers[victim].suspect, "the scheduler to know it suspect")
                items = burst(8, seed=400)
                results = await asyncio.wait_for(encode_all(engine, items), WAIT_S)  # none waits on the victim
                for result, item in zip(results, items):
                    with result:
                        check(result, item, model)
                        assert served_by(result.refs[0])[0] == survivor
                assert in_flight(engine, victim) == 0 and engine.health().ready
            finally:
                os.kill(pids[victim], signal.SIGCONT)
            health = await health_when(engine, lambda h: h.workers_ready == 2, "both workers ready again")
            assert health.ready and health.detail == "" and health.worker_pids == pids
            assert not engine.scheduler.workers[victim].suspect
            assert engine.stats()["worker_restarts"] == 0 and engine.stats()["worker_hangs"] == 0
            results = await encode_all(engine, burst(8, seed=500))
            for result in results:
                result.release()

    asyncio.run(run())


# -- 5. without restarts -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_without_restarts_a_killed_worker_leaves_the_engine_serving_on_the_others(model, workers):
    """Killed while it runs windows of a burst: they are retried on the other workers (a retry
    needs no restart), and the engine goes on with one worker fewer for good."""
    victim, survivors = workers - 1, list(range(workers - 1))
    load = burst(24, seed=600)

    async def run() -> None:
        async with Engine(config(workers, worker_restarts=0)) as engine:
            pids = engine.health().worker_pids  # (in worker order while all run)
            running = [asyncio.ensure_future(engine.encode(items)) for items in load]
            try:
                await until(lambda: in_flight(engine, victim) > 0, "a window on the victim")
            finally:
                os.kill(pids[victim], signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*running), WAIT_S)
            try:
                for result, items in zip(results, load):
                    check(result, items, model)
            finally:
                for result in results:
                    result.release()
            health = await health_when(engine, lambda h: h.workers_ready == workers - 1, "the loss to be noticed")
            assert health.ready and health.workers == workers, health
            assert "no worker is up" not in health.detail
            assert health.worker_pids == pids[:victim]
            assert health.pids_by_worker == {w: pids[w] for w in range(workers) if w != victim}
            assert f"worker {victim} is down" in health.detail  # (named while the others serve)
            status, text = await scrape(engine, "/readyz")
            assert (status, text) == (200, f"ready: {workers - 1} of {workers} workers up\n")
            # Later requests, many at once (4 full windows), go to every survivor; nothing restarts.
            later = burst(8, seed=700)
            results = await encode_all(engine, later)
            try:
                for result, items in zip(results, later):
                    check(result, items, model)
                assert {served_by(ref) for result in results for ref in result.refs} == {(w, 0) for w in survivors}
            finally:
                for result in results:
                    result.release()
            stats = engine.stats()
            assert stats["worker_restarts"] == 0 and stats["workers_ready"] == workers - 1
            # (a release reaches the engine a loop turn later)
            await until(lambda: engine.stats()["requests_open"] == 0, "the releases")

    asyncio.run(run())
