"""Kept items (engine/kept.py): a client encodes items under names (`keep=`), another finds them by name
(`lookup`), over ipc:// and tcp://, until the names are forgotten, expire or are evicted past the
kept share of the output rows; what a lookup holds stays readable until released; nothing stays
leased once everything is released and forgotten; bad names and times are refused."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from served import local_endpoint, served

from vitserve import AsyncClient, Client, Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.workers import WindowConfig

BUDGETS = ("--min-budget", "64", "--max-budget", "512")


def images(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64 + 32 * (i % 3), 64, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def endpoint(request, tmp_path_factory):
    where = local_endpoint(request.param, tmp_path_factory.mktemp("sock"))
    with served(where, *BUDGETS, "--kept-timeout-s", "30"):
        yield where


def settled(client: Client) -> dict:
    time.sleep(0.1)  # releases and forgets are messages without replies
    return client.stats()


def test_another_client_finds_kept_items_by_name_until_they_are_forgotten(endpoint):
    with Client(endpoint) as producer, Client(endpoint) as consumer:
        with producer.encode(images(), keep=["a", "", "c"]) as result:
            expected = [item.packed.clone() for item in result.items]
        assert settled(producer)["kept_items"] == 2
        with consumer.lookup(["c", "b", "a", "nobody"]) as found:
            assert found.items[1] is None and found.items[3] is None  # "b" was not kept, "nobody" never was
            assert torch.equal(found.items[0].packed, expected[2]) and torch.equal(found.items[2].packed, expected[0])
            assert found.items[0].grid == result.items[2].grid and found.items[0].kind == "image"
            consumer.forget(["a", "c"])
            assert settled(consumer)["kept_items"] == 0
            assert torch.equal(found.items[2].packed, expected[0])  # held by the lookup: not overwritten
            producer.encode(images(6, seed=1)).release()  # other windows meanwhile
            assert torch.equal(found.items[2].packed, expected[0])
        with consumer.lookup(["a"]) as again:
            assert again.items == [None]
        stats = settled(consumer)
        assert stats["slots_leased"] == 0 and stats["requests_open"] == 0, stats
        assert stats["kept_hits"] >= 2


def test_a_kept_item_expires_after_its_keep_time(endpoint):
    with Client(endpoint) as client:
        client.encode(images(1), keep=["soon"], keep_s=0.3).release()
        with client.lookup(["soon"]) as found:
            assert found.items[0] is not None
        time.sleep(1.6)  # (expiry is checked every second)
        with client.lookup(["soon"]) as found:
            assert found.items == [None]
        assert settled(client)["slots_leased"] == 0


def test_keep_that_cannot_be_honoured_is_refused(endpoint):
    with Client(endpoint) as client:
        with pytest.raises(EngineError, match="give one name per item") as refused:
            client.encode(images(2), keep=["only-one"])
        assert refused.value.code == "invalid_input"
        with pytest.raises(EngineError, match="kept_timeout_s=30"):
            client.encode(images(1), keep=["x"], keep_s=31)
        with pytest.raises(EngineError) as too_long:
            client.encode(images(1), keep=["x" * 257])
        assert too_long.value.code == "protocol"
        with pytest.raises(EngineError, match="give keep names too"):
            client.encode(images(1), keep_s=5)
        client.encode(images(1)).release()  # the connection still serves


def test_a_consumer_that_leaves_without_releasing_frees_what_it_held(endpoint):
    with Client(endpoint) as producer:
        producer.encode(images(1), keep=["held"]).release()
        consumer = Client(endpoint)
        found = consumer.lookup(["held"])
        assert found.items[0] is not None
        consumer.close()  # its lookup is released with its connection
        producer.forget(["held"])
        deadline = time.monotonic() + 5
        while settled(producer)["slots_leased"] and time.monotonic() < deadline:
            pass
        assert settled(producer)["slots_leased"] == 0


def test_kept_items_past_the_kept_share_evict_the_oldest_and_never_block_the_engine():
    """An embedded engine with a small share: keeping far more than it allows forgets the oldest,
    and new requests keep being served."""
    config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=512), output_windows=4, kept_share=0.25,
                          max_item_tokens=512)  # (the output: 4 windows of rows, not one largest item)

    async def run() -> tuple[dict, list, int]:
        async with Engine(config) as engine:
            for i in range(40):
                (await engine.encode(images(1, seed=i), keep=[f"k{i}"])).release()
            with await engine.lookup([f"k{i}" for i in range(40)]) as found:
                present = [item is not None for item in found.items]
            return engine.stats(), present, engine.layout.slots * engine.layout.slot_rows

    stats, present, worker_rows = asyncio.run(run())
    assert stats["kept_evicted"] > 0 and present[-1] and not present[0]
    assert present == sorted(present)  # the oldest went first
    assert 0 < stats["kept_rows"] <= 0.25 * worker_rows


def test_an_async_client_keeps_and_looks_up(tmp_path):
    endpoint = f"ipc://{tmp_path}/vitserve.sock"

    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            (await client.encode(images(1), keep=["x"])).release()
            with await client.lookup(["x"]) as found:
                assert found.items[0].embeddings.shape[1] == 128
            await client.forget(["x"])

    with served(endpoint, *BUDGETS):
        asyncio.run(run())


def test_items_kept_from_one_window_count_its_rows_once():
    """Twenty-four small images in one request share a window: keeping each of them must not count the
    window's rows twenty-four times (and evict most of them at once)."""
    config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=4096), max_item_tokens=8192)

    async def run() -> tuple[dict, list]:
        async with Engine(config) as engine:
            names = [f"img-{i}" for i in range(24)]
            (await engine.encode([np.zeros((64, 64, 3), np.uint8)] * 24, keep=names)).release()
            with await engine.lookup(names) as found:
                present = [item is not None for item in found.items]
            return engine.stats(), present

    stats, present = asyncio.run(run())
    assert all(present) and stats["kept_evicted"] == 0 and stats["kept_items"] == 24, stats


def test_an_item_larger_than_the_kept_share_is_refused_naming_the_setting():
    config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=512), output_windows=2, kept_share=0.1,
                          max_item_tokens=1024)

    async def run() -> None:
        async with Engine(config) as engine:
            with pytest.raises(EngineError, match="raise --kept-share") as refused:
                await engine.encode([np.zeros((512, 512, 3), np.uint8)], keep=["big"])
            assert refused.value.code == "too_large"
            (await engine.encode([np.zeros((512, 512, 3), np.uint8)])).release()  # unkept, it is served

    asyncio.run(run())
