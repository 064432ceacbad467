"""VitserveECConnector taken through the hooks of a vLLM 0.33 EC consumer, in vLLM's order, against
`vitserve serve`: the scheduler side finds the items a proxy kept under their uuids, the worker side
copies them from shared memory into the encoder cache (rows as vLLM's example connector would load
them), and items are forgotten once no unfinished request loads them. vLLM does not run here: with
it installed the class derives from its ECConnectorBase, otherwise from a stand-in with the same
hooks, and the hooks' signatures are checked against vLLM 0.33's."""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from served import served

from vitserve import Client
from vitserve.integrations.vllm_connector import VitserveECConnector, VitserveECMetadata

# vLLM 0.33.0's ECConnectorBase hooks that a consumer's connector implements (parameter names).
HOOKS = {
    "has_cache_item": ["identifier"],
    "update_state_after_alloc": ["request", "index"],
    "build_connector_meta": ["scheduler_output"],
    "request_finished": ["request"],
    "start_load_caches": ["encoder_cache", "kwargs"],
    "save_caches": ["encoder_cache", "mm_hash", "kwargs"],
    "bind_connector_metadata": ["connector_metadata"],
    "clear_connector_metadata": [],
}


def vllm_config(endpoint: str | None, role: str = "ec_consumer") -> SimpleNamespace:
    extra = {"vitserve_endpoint": endpoint} if endpoint else {}
    transfer = SimpleNamespace(is_ec_producer=role == "ec_producer", is_ec_consumer=role == "ec_consumer",
                               get_from_extra_config=lambda key, default: extra.get(key, default))
    return SimpleNamespace(ec_transfer_config=transfer, model_config=SimpleNamespace(dtype=torch.float32))


def request(request_id: str, *names: str) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, mm_features=[SimpleNamespace(identifier=name) for name in names])


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (64, 64 + 32 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    where = f"ipc://{tmp_path_factory.mktemp('sock')}/vitserve.sock"
    with served(where, "--min-budget", "64", "--max-budget", "512"):
        yield where


def test_the_hooks_have_vllm_0_33_signatures():
    for name, parameters in HOOKS.items():
        signature = inspect.signature(getattr(VitserveECConnector, name))
        assert list(signature.parameters)[1:] == parameters, name
    try:
        from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase
    except ImportError:
        return  # (vLLM is not installed here)
    assert issubclass(VitserveECConnector, ECConnectorBase) and not inspect.isabstract(VitserveECConnector)


def test_a_consumer_loads_kept_items_from_shared_memory_and_forgets_them_when_done(endpoint):
    with Client(endpoint) as proxy:
        with proxy.encode(images(2), keep=["uuid-a", "uuid-b"]) as result:
            expected = {"uuid-a": result.items[0].packed.clone(), "uuid-b": result.items[1].packed.clone()}
        scheduler = VitserveECConnector(vllm_config(endpoint), "scheduler")
        worker = VitserveECConnector(vllm_config(endpoint), "worker")  # (another process in vLLM)
        try:
            assert scheduler.has_cache_item("uuid-a") and not scheduler.has_cache_item("uuid-never")
            first, second = request("r1", "uuid-a", "uuid-b"), request("r2", "uuid-a")
            for index in range(2):
                scheduler.update_state_after_alloc(first, index)
            scheduler.update_state_after_alloc(second, 0)
            meta = scheduler.build_connector_meta(scheduler_output=None)
            assert isinstance(meta, VitserveECMetadata)
            assert [name for name, _ in meta.items] == ["uuid-a", "uuid-b", "uuid-a"]
            assert scheduler.build_connector_meta(scheduler_output=None).items == []  # built once per step
            proxy.forget(["uuid-a", "uuid-b"])  # at vitserve, meanwhile: the scheduler's holds keep the rows
            proxy.encode(images(4)).release()  # other windows meanwhile
            time.sleep(0.1)

            encoder_cache: dict[str, torch.Tensor] = {}
            worker.bind_connector_metadata(meta)
            worker.start_load_caches(encoder_cache)
            worker.clear_connector_metadata()
            assert sorted(encoder_cache) == ["uuid-a", "uuid-b"]
            for name, rows in encoder_cache.items():
                assert torch.equal(rows, expected[name]) and rows.shape[1] == 128 * 3  # [rows, out_hidden * (1 + 2)]
                assert rows.untyped_storage().data_ptr() != expected[name].untyped_storage().data_ptr()

            assert scheduler.request_finished(first) == (False, None)
            assert proxy.stats()["slots_leased"] > 0  # r2 still holds uuid-a
            scheduler.request_finished(second)
            time.sleep(0.1)  # (releases are messages without replies)
            assert proxy.stats()["slots_leased"] == 0
        finally:
            scheduler.shutdown()
            worker.shutdown()


def test_items_are_forgotten_once_no_unfinished_request_loads_them(endpoint):
    with Client(endpoint) as proxy:
        proxy.encode(images(2), keep=["uuid-c", "uuid-d"]).release()
        scheduler = VitserveECConnector(vllm_config(endpoint), "scheduler")
        try:
            first, second = request("r1", "uuid-c", "uuid-d"), request("r2", "uuid-c")
            for req, index in ((first, 0), (first, 1), (second, 0)):
                scheduler.update_state_after_alloc(req, index)
            scheduler.build_connector_meta(scheduler_output=None)
            scheduler.request_finished(first)
            time.sleep(0.1)  # (forget is a message without a reply)
            assert not scheduler.has_cache_item("uuid-d")  # no other request loads it
            assert scheduler.has_cache_item("uuid-c")  # r2 still does
            scheduler.request_finished(second)
            time.sleep(0.1)
            assert not scheduler.has_cache_item("uuid-c")
            scheduler.update_state_after_alloc(request("r3", "uuid-c"), 0)  # gone: nothing to load, nothing held
            assert scheduler.build_connector_meta(scheduler_output=None).items == []
            assert proxy.stats()["slots_leased"] == 0
        finally:
            scheduler.shutdown()


def test_a_producer_role_or_a_missing_endpoint_is_refused_at_start():
    with pytest.raises(ValueError, match="for EC consumers"):
        VitserveECConnector(vllm_config("ipc:///x.sock", role="ec_producer"), "worker")
    with pytest.raises(ValueError, match="vitserve_endpoint"):
        VitserveECConnector(vllm_config(None), "worker")
