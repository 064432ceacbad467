"""ECFileStore: vitserve results as the files vLLM's ECExampleConnector loads (vLLM 0.33's contract, as
documented in its example connector: `<shared_storage_path>/<key>/encoder_cache.safetensors`, one
tensor `ec_cache` of shape [rows, out_hidden * (1 + deepstack)], each row's embedding and then its
deepstack features), written atomically and expired by age and total size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from served import served

from vitserve.engine import EngineConfig
from vitserve.integrations.embedded import EmbeddedEncoder
from vitserve.integrations.vllm_files import EC_FILE, EC_TENSOR, ECFileStore
from vitserve.preprocess import preprocess_image
from vitserve.workers import WindowConfig


@pytest.fixture(scope="module")
def encoder():
    with EmbeddedEncoder(EngineConfig(window=WindowConfig(min_budget=64, max_budget=512))) as encoder:
        yield encoder


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (96, 160, 3))] + [
        rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)]


def test_each_item_is_stored_as_vllm_loads_it(encoder, tmp_path):
    store = ECFileStore(tmp_path)
    keys = ["img-0", "lora-a:img-1", "video-7"]
    with encoder.encode(images()) as result:
        for key, item in zip(keys, result.items):
            path = store.put(key, item)
            assert path == tmp_path / key / EC_FILE
            loaded = load_file(path, device="cpu")
            assert list(loaded) == [EC_TENSOR]
            rows = loaded[EC_TENSOR]  # [num_embeds, width]
            out_hidden, layers = item.embeddings.shape[1], item.deepstack.shape[0]
            assert rows.shape == (item.embeddings.shape[0], out_hidden * (1 + layers)) and rows.dtype == torch.float32
            t, h, w = item.grid
            assert rows.shape[0] == t * h * w // 4  # the placeholders of the grid vLLM is told
            assert torch.equal(rows[:, :out_hidden], item.embeddings)
            for layer in range(layers):
                assert torch.equal(rows[:, out_hidden * (1 + layer):out_hidden * (2 + layer)], item.deepstack[layer])
    assert sorted(os.listdir(tmp_path)) == sorted(keys)  # nothing else: no temporary files left


def test_the_models_dtype_and_plain_tensors(tmp_path):
    store = ECFileStore(tmp_path, dtype=torch.bfloat16)
    rows = torch.randn(6, 12)
    loaded = load_file(store.put("k", rows))[EC_TENSOR]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, rows.to(torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        store.put("k", torch.zeros(2, 3, 4))


@pytest.mark.parametrize("key", ["", ".", "..", "a/b", "/abs", "nul\0", ".encoder_cache.safetensors.1.x"])
def test_keys_that_cannot_name_a_folder_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="cannot name a folder"):
        ECFileStore(tmp_path).put(key, torch.zeros(1, 2))


def test_a_reader_never_sees_a_partial_file(tmp_path):
    """vLLM loads whatever file is there: while one key is rewritten again and again, every load
    gives one whole version."""
    store = ECFileStore(tmp_path)
    versions = [torch.full((512, 256), float(v)) for v in range(4)]
    store.put("k", versions[0])
    stop, seen, problems = threading.Event(), set(), []

    def read() -> None:
        while not stop.is_set():
            try:
                rows = load_file(tmp_path / "k" / EC_FILE)[EC_TENSOR]
            except Exception as err:  # a partial file fails to parse
                problems.append(err)
                continue
            value = rows[0, 0].item()
            if not torch.equal(rows, versions[int(value)]):
                problems.append(f"mixed version {value}")
            seen.add(value)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        store.put("k", versions[i % 4])
    stop.set()
    reader.join()
    assert not problems and len(seen) > 1, (problems[:3], seen)


def test_expiry_by_age_and_total_size_spares_the_young(tmp_path):
    store = ECFileStore(tmp_path, max_bytes=3 * 4096 + 3 * 200, max_age_s=600, min_age_s=60)
    now = time.time()
    ages = {"ancient": 900, "old": 500, "older": 400, "middle": 300, "recent": 120, "fresh": 10, "new": 1}
    for key, age in ages.items():
        path = store.put(key, torch.zeros(1, 1024))  # 4096 bytes of rows, and a small header
        os.utime(path, (now - age, now - age))
    crashed = tmp_path / "new" / ".encoder_cache.safetensors.999.dead"  # a writer that died mid-way
    crashed.write_bytes(b"x")
    os.utime(crashed, (now - 120, now - 120))
    removed = store.expire(now)
    left = sorted(os.listdir(tmp_path))
    # ancient: past max_age_s; then oldest first until at most ~3 files' worth: old, older, middle go;
    # fresh and new are younger than min_age_s and stay even though the total is still over.
    assert left == ["fresh", "new", "recent"] and removed == 4, left
    assert os.listdir(tmp_path / "new") == [EC_FILE]  # the dead writer's file is gone
    assert store.expire(now) == 0


def test_size_limit_does_not_remove_what_a_consumer_may_be_loading(tmp_path):
    store = ECFileStore(tmp_path, max_bytes=1, min_age_s=60)
    for key in "abc":
        store.put(key, torch.zeros(4, 4))
    assert store.expire() == 0 and sorted(os.listdir(tmp_path)) == ["a", "b", "c"]
    assert store.expire(time.time() + 61) == 3 and os.listdir(tmp_path) == []


def test_the_example_client_stores_each_image_and_names_it_in_the_request(tmp_path):
    """examples/vllm_epd_client.py against `vitserve serve`, printing the request it would send."""
    endpoint, ec_dir = f"ipc://{tmp_path}/vitserve.sock", tmp_path / "ec"
    files = []
    for i, image in enumerate(images()[:2]):
        files.append(tmp_path / f"image-{i}.npy")
        np.save(files[-1], image)
    example = Path(__file__).parent.parent / "examples" / "vllm_epd_client.py"
    with served(endpoint, "--min-budget", "64", "--max-budget", "512"):
        done = subprocess.run([sys.executable, str(example), "--vitserve", endpoint, "--ec-dir", str(ec_dir),
                               "--model", "tiny", "--dry-run", *map(str, files), "What is it?"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    content = json.loads(done.stdout)["messages"][0]["content"]
    assert content[-1] == {"type": "text", "text": "What is it?"}
    for part, image in zip(content[:-1], images()):
        assert part["type"] == "image_embeds" and set(part) == {"type", "image_embeds", "uuid"}
        t, h, w = part["image_embeds"]["image_grid_thw"]
        rows = load_file(ec_dir / part["uuid"] / EC_FILE)[EC_TENSOR]
        assert rows.shape == (t * h * w // 4, 128 * 3)
        assert [t, h, w] == preprocess_image(image).grid_thw[0].tolist()


def test_the_empty_folders_a_consumers_misses_leave_are_removed(tmp_path):
    """vLLM's example connector makes `<root>/<key>/` when it looks a key up, found or not."""
    store = ECFileStore(tmp_path, min_age_s=60)
    missed = tmp_path / "asked-for-but-never-stored"
    missed.mkdir()
    store.put("kept", torch.zeros(2, 2))
    assert store.expire() == 0 and missed.is_dir()  # young: a producer may be about to write it
    store.expire(time.time() + 61)
    assert not missed.exists() and (tmp_path / "kept").is_dir()


def test_vllms_own_example_connector_loads_the_files(encoder, tmp_path, monkeypatch):
    """Where vLLM is installed (CPU platform is enough): its ECExampleConnector, configured as a user
    configures a consumer, finds the files, and its worker side loads exactly the stored rows."""
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.config import ECTransferConfig, VllmConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector

    store = ECFileStore(tmp_path)
    with encoder.encode(images()) as result:
        expected = {f"uuid-{i}": item.packed.clone() for i, item in enumerate(result.items)}
        for key, item in zip(expected, result.items):
            store.put(key, item)
    transfer = ECTransferConfig(ec_connector="ECExampleConnector", ec_role="ec_consumer",
                                ec_connector_extra_config={"shared_storage_path": str(tmp_path)})
    config = VllmConfig(ec_transfer_config=transfer)
    scheduler = ECExampleConnector(config, ECConnectorRole.SCHEDULER)
    worker = ECExampleConnector(config, ECConnectorRole.WORKER)
    assert all(scheduler.has_cache_item(key) for key in expected) and not scheduler.has_cache_item("uuid-none")
    request = SimpleNamespace(mm_features=[SimpleNamespace(identifier=key) for key in expected],
                              get_num_encoder_embeds=lambda index: expected[f"uuid-{index}"].shape[0])
    for index in range(len(expected)):
        scheduler.update_state_after_alloc(request, index)
    worker.bind_connector_metadata(scheduler.build_connector_meta(None))
    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(encoder_cache)
    assert sorted(encoder_cache) == sorted(expected)
    for key, rows in expected.items():
        assert torch.equal(encoder_cache[key], rows)
    store.expire(time.time() + 3600)  # the empty folder its miss made goes too (once old enough)
    assert not (tmp_path / "uuid-none").exists()
