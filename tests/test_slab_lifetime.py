"""Slab lifetime: close, stale-slab cleanup after a crash, the worker's writable mapping, and runs of
consecutive slots."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from vitserve.ipc.slab_maps import SlabReader, remove_stale_slabs, writable_slab
from vitserve.ipc.slabs import SHM_DIR, SlabError, SlabPool, parse_slab_name


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


# -- readers let go of retired slabs ------------------------------------------------------------


def mappings_of(path: Path) -> int:
    """How many mappings of `path` this process holds (an unlinked file shows as "PATH (deleted)")."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sum(line.endswith((f" {path}", f" {path} (deleted)")) for line in lines)


def slab_file(directory: Path, epoch: int, value: float, owner: str = "w0") -> str:
    """A slab as an engine's pool leaves it, without the pool's own mapping in this process."""
    name = f"vitserve-{os.getpid()}-{owner}-e{epoch}-0"
    (directory / name).write_bytes(np.full(1024, value, np.float32).tobytes())
    return name


def test_a_reader_unmaps_an_older_epoch_once_a_newer_one_of_its_owner_is_mapped(tmp_path: Path):
    reader = SlabReader(tmp_path)
    old, other = slab_file(tmp_path, 0, 1.0), slab_file(tmp_path, 0, 3.0, owner="w1")
    old_view = reader.array(old, 0, 0, (4,), "float32")
    reader.array(other, 0, 0, (4,), "float32")
    new = slab_file(tmp_path, 1, 2.0)  # the worker restarted: its slabs have a new epoch
    assert reader.array(new, 1, 0, (4,), "float32").tolist() == [2.0] * 4
    assert old_view.tolist() == [1.0] * 4 and mappings_of(tmp_path / old) == 1  # a view handed out keeps it
    del old_view
    gc.collect()
    assert mappings_of(tmp_path / old) == 0
    assert mappings_of(tmp_path / other) == 1 and mappings_of(tmp_path / new) == 1  # another owner's stays
    again = reader.array(old, 0, 0, (4,), "float32")  # a result from before the restart still reads...
    assert again.tolist() == [1.0] * 4
    del again
    gc.collect()
    assert mappings_of(tmp_path / old) == 0  # ...but its mapping is not kept
    assert reader.array(new, 1, 0, (4,), "float32").tolist() == [2.0] * 4
    reader.close()
    assert mappings_of(tmp_path / new) == 0


def test_a_reader_unmaps_slabs_whose_files_are_gone(tmp_path: Path):
    reader = SlabReader(tmp_path)
    first = slab_file(tmp_path, 0, 1.0)
    reader.array(first, 0, 0, (4,), "float32")
    (tmp_path / first).unlink()  # its pool closed (or its engine exited)
    assert reader.array(slab_file(tmp_path, 0, 2.0, owner="w1"), 0, 0, (4,), "float32").tolist() == [2.0] * 4
    assert mappings_of(tmp_path / first) == 0
    with pytest.raises(SlabError, match="does not exist"):
        reader.array(first, 0, 0, (4,), "float32")
    reader.close()
