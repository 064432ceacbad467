"""Output slabs: slot leasing and reference counts, cross-process reads, stale references and cleanup."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vitserve.ipc.slab_maps import SlabReader, remove_stale_slabs, writable_slab
from vitserve.ipc.slabs import SHM_DIR, SlabError, SlabPool, Slot, numpy_dtype, parse_slab_name

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: reads each reference with SlabReader and prints the values it saw.
READER_SCRIPT = """
import json, sys, warnings
from pathlib import Path
import torch
from vitserve.ipc.slab_maps import SlabReader

request = json.loads(sys.argv[1])
reader = SlabReader(Path(request["directory"]))
seen = []
for ref in request["refs"]:
    array = reader.array(ref["slab"], ref["epoch"], ref["offset"], tuple(ref["shape"]), ref["dtype"])
    if ref["dtype"] == "bfloat16":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the view is read-only; it is only read here
            values = torch.from_numpy(array).view(torch.bfloat16).float().tolist()
    else:
        values = array.tolist()
    seen.append({"values": values, "writeable": bool(array.flags.writeable)})
reader.close()
print(json.dumps(seen))
"""


def read_in_another_process(directory: Path, refs: list[dict]) -> list[dict]:
    request = json.dumps({"directory": str(directory), "refs": refs})
    done = subprocess.run([sys.executable, "-c", READER_SCRIPT, request], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference(slot: Slot, shape: tuple[int, ...], dtype: str) -> dict:
    return {"slab": slot.slab, "epoch": slot.epoch, "offset": slot.offset, "shape": list(shape), "dtype": dtype}


@pytest.fixture
def pool(tmp_path: Path):
    with SlabPool("w0", slot_bytes=4096, slots=4, directory=tmp_path) as pool:
        yield pool


# -- leasing and reference counts --------------------------------------------------------------


def test_acquire_hands_out_distinct_slots_lowest_first_until_exhausted(pool: SlabPool):
    slots = [pool.acquire() for _ in range(4)]
    assert [s.index for s in slots] == [0, 1, 2, 3]
    assert len({s.offset for s in slots}) == 4
    assert all(pool.refcount(s) == 1 for s in slots)
    assert pool.free_slots() == 0
    assert pool.acquire() is None


def test_release_frees_and_the_lowest_free_slot_is_reused(pool: SlabPool):
    slots = [pool.acquire() for _ in range(3)]
    assert pool.release(slots[2]) is True
    assert pool.release(slots[0]) is True
    assert pool.free_slots() == 3
    assert pool.refcount(slots[0]) == 0
    assert pool.acquire() == slots[0]
    assert pool.acquire() == slots[2]


def test_hold_adds_references_and_only_the_last_release_frees(pool: SlabPool):
    slot = pool.acquire()
    pool.hold(slot)
    pool.hold(slot, count=2)
    assert pool.refcount(slot) == 4
    assert [pool.release(slot) for _ in range(4)] == [False, False, False, True]
    assert pool.refcount(slot) == 0
    assert pool.free_slots() == 4


def test_release_of_a_free_slot_names_the_slot(pool: SlabPool):
    slot = pool.acquire()
    pool.release(slot)
    with pytest.raises(SlabError, match=rf"slot 0 \(slab {slot.slab}, epoch 0, offset 0\) is not held"):
        pool.release(slot)
    with pytest.raises(SlabError, match="acquire a slot before holding it"):
        pool.hold(slot)
    with pytest.raises(SlabError, match="acquire it before writing"):
        pool.array(slot, (4,), "float32")


def test_slot_from_another_epoch_is_rejected_naming_the_slot(tmp_path: Path):
    with SlabPool("w0", 4096, 2, epoch=0, directory=tmp_path) as old, \
            SlabPool("w0", 4096, 2, epoch=1, directory=tmp_path) as new:
        stale = old.acquire()
        new.acquire()
        for operation in (new.release, new.hold, new.refcount):
            with pytest.raises(SlabError, match=rf"slab {stale.slab}, epoch 0, offset 0\) is from epoch 0 .*epoch 1"):
                operation(stale)
        assert old.release(stale) is True


def test_slot_from_another_pool_of_the_same_epoch_is_rejected(tmp_path: Path):
    with SlabPool("w0", 4096, 2, directory=tmp_path) as first, SlabPool("w1", 4096, 2, directory=tmp_path) as second:
        foreign = first.acquire()
        second.acquire()
        with pytest.raises(SlabError, match="does not belong to this pool"):
            second.release(foreign)
        with pytest.raises(SlabError, match="does not belong to this pool"):
            second.release(Slot(99, second.names[0], 0, 0))


# -- layout and views --------------------------------------------------------------------------


def test_slots_span_several_page_aligned_slab_files(tmp_path: Path):
    with SlabPool("w0", slot_bytes=1000, slots=5, slots_per_slab=2, directory=tmp_path) as pool:
        assert pool.slot_bytes == 4096
        assert pool.names == [f"vitserve-{os.getpid()}-w0-e0-{i}" for i in range(3)]
        assert [(tmp_path / name).stat().st_size for name in pool.names] == [8192, 8192, 4096]
        assert all(oct((tmp_path / name).stat().st_mode & 0o777) == "0o600" for name in pool.names)
        slots = [pool.acquire() for _ in range(5)]
        assert [(s.slab, s.offset) for s in slots] == [
            (pool.names[0], 0), (pool.names[0], 4096), (pool.names[1], 0), (pool.names[1], 4096), (pool.names[2], 0),
        ]
        assert all(s.offset % 4096 == 0 for s in slots)


def test_buffer_is_exactly_one_slot_and_writes_land_in_the_slot(pool: SlabPool):
    pool.acquire()
    second = pool.acquire()
    view = pool.buffer(second)
    assert len(view) == pool.slot_bytes and not view.readonly
    view[:3] = b"abc"
    assert bytes(pool.array(second, (3,), np.uint8)) == b"abc"
    assert not pool.array(pool._slot(0), (4096,), "uint8").any()
    del view


def test_array_that_does_not_fit_in_a_slot_says_to_raise_slot_bytes(pool: SlabPool):
    slot = pool.acquire()
    assert pool.array(slot, (1024,), "float32").flags.writeable
    with pytest.raises(SlabError, match="4100 bytes .* of 4096 bytes: acquire more slots, or create the pool with "
                                        "a larger slot_bytes"):
        pool.array(slot, (1025,), "float32")
    with pytest.raises(SlabError, match="invalid shape"):
        pool.array(slot, (-1, 4), "float32")
    with pytest.raises(SlabError, match="unsupported dtype"):
        pool.array(slot, (4,), "not_a_dtype")


def test_another_process_reads_exactly_what_was_written_including_bfloat16(tmp_path: Path):
    with SlabPool("w0", slot_bytes=4096, slots=3, slots_per_slab=1, epoch=7, directory=tmp_path) as pool:
        floats, bf16, small = pool.acquire(), pool.acquire(), pool.acquire()
        float_values = np.arange(24, dtype=np.float32).reshape(4, 6) / 3
        pool.array(floats, (4, 6), "float32")[:] = float_values
        bf16_values = torch.tensor([[1.5, -2.25, 3e-3], [1e4, 0.0, -7.0]], dtype=torch.bfloat16)
        torch.from_numpy(pool.array(bf16, (2, 3), "bfloat16")).view(torch.bfloat16).copy_(bf16_values)
        pool.array(small, (5,), np.int8)[:] = [-3, -1, 0, 1, 127]

        seen = read_in_another_process(tmp_path, [
            reference(floats, (4, 6), "float32"), reference(bf16, (2, 3), "bfloat16"), reference(small, (5,), "int8"),
        ])
    assert seen[0]["values"] == float_values.tolist()
    assert seen[1]["values"] == bf16_values.float().tolist()
    assert seen[2]["values"] == [-3, -1, 0, 1, 127]
    assert not any(entry["writeable"] for entry in seen)


def test_numpy_dtype_maps_bfloat16_to_uint16_storage():
    assert numpy_dtype("bfloat16") == np.dtype(np.uint16)
    assert numpy_dtype("float16") == np.dtype(np.float16)
    assert numpy_dtype(np.float32) == np.dtype(np.float32)
    for unsupported in ("nonsense", None, object):
        with pytest.raises(SlabError, match="unsupported dtype"):
            numpy_dtype(unsupported)


# -- reader ------------------------------------------------------------------------------------


def test_reader_views_in_place_read_only_and_maps_each_slab_once(pool: SlabPool, tmp_path: Path):
    slot = pool.acquire()
    written = pool.array(slot, (8,), "int32")
    written[:] = np.arange(8)
    reader = SlabReader(tmp_path)
    view = reader.array(slot.slab, slot.epoch, slot.offset, (8,), "int32")
    assert view.tolist() == list(range(8))
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1
    written[0] = 42  # in place: the reader's view sees later writes without reading again
    assert view[0] == 42
    reader.array(slot.slab, slot.epoch, slot.offset + 32, (2,), "int32")
    assert list(reader._maps) == [slot.slab]
    reader.close()


def test_reader_rejects_a_stale_epoch(pool: SlabPool, tmp_path: Path):
    slot = pool.acquire()
    with pytest.raises(SlabError, match=r"stale reference: slab .*-e0-0 belongs to epoch 0, the reference to epoch 1"):
        SlabReader(tmp_path).array(slot.slab, 1, slot.offset, (4,), "float32")


def test_reader_reports_a_missing_slab(tmp_path: Path):
    with pytest.raises(SlabError, match="does not exist: its worker exited or closed it"):
        SlabReader(tmp_path).array(f"vitserve-{os.getpid()}-w0-e0-0", 0, 0, (4,), "float32")


def test_reader_rejects_names_that_are_not_vitserve_slabs(tmp_path: Path):
    for name in ("../etc/passwd", "vitserve-12-w-0-e0-0", "vitserve-012-w0-e0-0", "other"):
        with pytest.raises(SlabError, match="is not a vitserve slab name"):
            SlabReader(tmp_path).array(name, 0, 0, (1,), "uint8")


def test_reader_rejects_out_of_bounds_references(pool: SlabPool, tmp_path: Path):
    slot = pool.acquire()
    reader = SlabReader(tmp_path)
    assert reader.array(slot.slab, 0, 4096 * 4 - 4, (1,), "float32").shape == (1,)  # the very end still fits
    for offset, shape in ((4096 * 4 - 4, (2,)), (-4, (1,)), (4096 * 4, (1,))):
        with pytest.raises(SlabError, match=f"at offset {offset} do not fit in slab {slot.slab} of 16384 bytes"):
            reader.array(slot.slab, 0, offset, shape, "float32")


def test_forget_keeps_handed_out_views_valid_and_maps_again_on_next_use(pool: SlabPool, tmp_path: Path):
    slot = pool.acquire()
    pool.array(slot, (4,), "float64")[:] = [1, 2, 3, 4]
    reader = SlabReader(tmp_path)
    view = reader.array(slot.slab, 0, slot.offset, (4,), "float64")
    reader.forget(slot.slab)
    reader.forget(slot.slab)  # forgetting an unmapped slab is a no-op
    assert view.tolist() == [1, 2, 3, 4]
    assert reader.array(slot.slab, 0, slot.offset, (4,), "float64").tolist() == [1, 2, 3, 4]
    reader.close()
    assert view.tolist() == [1, 2, 3, 4]


# -- lifetime and cleanup ----------------------------------------------------------------------


def test_close_removes_every_file_is_idempotent_and_later_use_raises(tmp_path: Path):
    pool = SlabPool("w0", 4096, 4, slots_per_slab=1, directory=tmp_path)
    slot = pool.acquire()
    view = pool.array(slot, (4,), "float32")  # an outstanding view must not stop close()
    assert len(os.listdir(tmp_path)) == 4
    pool.close()
    pool.close()
    assert os.listdir(tmp_path) == []
    assert view.shape == (4,)
    with pytest.raises(SlabError, match="is closed: create a new pool"):
        pool.acquire()
    with pytest.raises(SlabError, match="is closed"):
        pool.release(slot)


def test_context_manager_creates_and_removes_slabs_in_dev_shm():
    owner = f"pytest_{uuid.uuid4().hex[:8]}"
    with SlabPool(owner, slot_bytes=100, slots=3, slots_per_slab=2) as pool:
        assert pool.directory == SHM_DIR
        assert all((SHM_DIR / name).is_file() for name in pool.names) and len(pool.names) == 2
        slot = pool.acquire()
        pool.array(slot, (3,), "float32")[:] = [1, 2, 3]
        assert SlabReader().array(slot.slab, 0, slot.offset, (3,), "float32").tolist() == [1, 2, 3]
    assert not [name for name in os.listdir(SHM_DIR) if owner in name]


def test_a_garbage_collected_pool_removes_its_files(tmp_path: Path):
    pool = SlabPool("w0", 4096, 2, directory=tmp_path)
    assert os.listdir(tmp_path)
    del pool
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_a_failed_construction_leaves_no_slabs_behind(tmp_path: Path):
    taken = tmp_path / f"vitserve-{os.getpid()}-w0-e0-1"
    taken.write_bytes(b"someone else's")
    with pytest.raises(SlabError, match="already exists: close the other pool .* or choose another owner label"):
        SlabPool("w0", 4096, 4, slots_per_slab=2, directory=tmp_path)
    assert os.listdir(tmp_path) == [taken.name]


def test_remove_stale_slabs_removes_only_slabs_of_dead_processes(tmp_path: Path):
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(exited.stdout)  # the child has exited and been reaped, so the pid names no process
    dead = [f"vitserve-{dead_pid}-w0-e3-0", f"vitserve-{dead_pid}-w1-e0-2"]
    kept = [f"vitserve-{os.getpid()}-w0-e0-0", f"vitserve-{dead_pid}-w0-e0-x", f"other-{dead_pid}-w0-e0-0", "unrelated"]
    for name in dead + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_slabs(tmp_path) == sorted(dead)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_slabs(tmp_path) == []


def test_parse_slab_name():
    assert parse_slab_name("vitserve-123-w0-e4-5") == (123, "w0", 4, 5)
    assert parse_slab_name("vitserve-1-worker_A-e0-0") == (1, "worker_A", 0, 0)
    for name in ("vitserve-0-w0-e0-0", "vitserve-1-w-0-e0-0", "vitserve-1-w0-e01-0", "vitserve-1-w0-e0-0.tmp",
                 "vitserve-1-w0-0-0", "psm_123", ""):
        assert parse_slab_name(name) is None


@pytest.mark.parametrize("arguments, message", [
    ({"owner": "w-0"}, "owner must be 1-64 letters, digits or _ like 'w0'"),
    ({"owner": ""}, "owner must be"),
    ({"owner": "w" * 65}, "owner must be"),
    ({"slot_bytes": 0}, "slot_bytes must be an integer >= 1, got 0: pass the largest window output in bytes"),
    ({"slots": -1}, "slots must be an integer >= 1, got -1: pass how many windows"),
    ({"slots": 2.0}, "slots must be an integer >= 1, got 2.0"),
    ({"slots": True}, "slots must be an integer >= 1, got True"),
    ({"slots_per_slab": 0}, "slots_per_slab must be an integer >= 1, got 0: or pass None"),
    ({"epoch": -1}, "epoch must be an integer >= 0, got -1: increase it on every worker restart"),
])
def test_invalid_constructor_arguments_say_what_to_change(tmp_path: Path, arguments: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SlabPool(**{"owner": "w0", "slot_bytes": 4096, "slots": 2, "directory": tmp_path, **arguments})
    assert os.listdir(tmp_path) == []


def test_hold_count_must_be_positive(pool: SlabPool):
    slot = pool.acquire()
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        pool.hold(slot, 0)
    assert pool.refcount(slot) == 1


def test_close_in_a_forked_child_leaves_the_parents_slabs(pool: SlabPool, tmp_path: Path):
    child = os.fork()
    if child == 0:  # the child inherited the pool object; closing it there must not unlink the parent's files
        pool.close()
        os._exit(0)
    os.waitpid(child, 0)
    assert os.listdir(tmp_path) == pool.names
    assert pool.acquire() is not None


def test_worker_mapping_writes_what_the_reader_sees(pool: SlabPool, tmp_path: Path):
    slot = pool.acquire()
    mapping = writable_slab(slot.slab, tmp_path)
    np.frombuffer(mapping, dtype=np.float32, count=4, offset=slot.offset)[:] = [1.0, 2.0, 3.0, 4.0]
    reader = SlabReader(tmp_path)
    assert reader.array(slot.slab, slot.epoch, slot.offset, (4,), "float32").tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(SlabError, match="is not a vitserve slab name"):
        writable_slab("other-file", tmp_path)
    with pytest.raises(SlabError, match="does not exist: the engine removed it"):
        writable_slab(pool.names[0].replace("-e", "-e9"), tmp_path)


# -- runs of consecutive slots ----------------------------------------------------------------


def test_runs_are_first_fit_within_one_slab_and_free_together(tmp_path: Path):
    with SlabPool("w1", slot_bytes=4096, slots=6, slots_per_slab=3, directory=tmp_path) as pool:
        a = pool.acquire(2)
        assert (a.index, a.count, a.offset, a.slab) == (0, 2, 0, pool.names[0])
        b = pool.acquire(2)  # one slot left in slab 0: the run starts the next slab
        assert (b.index, b.offset, b.slab) == (3, 0, pool.names[1])
        assert pool.free_slots() == 2 and pool.largest_free_run() == 1
        assert pool.acquire(2) is None
        assert pool.array(a, (2048,), "float32").shape == (2048,)  # the whole run is writable
        pool.hold(a)
        assert not pool.release(a) and pool.release(a)
        assert pool.largest_free_run() == 3 and pool.acquire(3).index == 0
        with pytest.raises(SlabError, match=r"slots 0-1 .* is not held"):
            pool.release(a)  # the run of two was freed; slots 0-2 are now one run of three
        with pytest.raises(ValueError, match="count must be an integer >= 1"):
            pool.acquire(0)
