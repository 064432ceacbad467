"""Slab lifetime: close, failures that leave nothing open, forks, runs of consecutive slots, and
readers that let go of retired slabs."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from slab_helpers import opener, slab_files

from vitserve.ipc import slabs
from vitserve.ipc.sealed import create_sealed
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabError, SlabPool, parse_slab_name


# -- lifetime --------------------------------------------------------------------------------


def mappings_of(name: str) -> int:
    """How many mappings of the memory file `name` this process holds."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sum(line.endswith(f" /memfd:{name} (deleted)") for line in lines)


def test_close_closes_every_slab_is_idempotent_and_later_use_raises():
    pool = SlabPool("w0", 4096, 4, slots_per_slab=1)
    slot = pool.acquire()
    view = pool.array(slot, (4,), "float32")  # an outstanding view must not stop close()
    view[:] = 7
    assert set(pool.names) <= set(slab_files(os.getpid())) and len(pool.names) == 4
    pool.close()
    pool.close()
    assert pool.descriptor(pool.names[0]) is None
    assert view.tolist() == [7] * 4 and mappings_of(slot.slab) == 1  # the view keeps its memory
    del view
    gc.collect()
    assert mappings_of(slot.slab) == 0  # and the memory goes with it: nothing is left anywhere
    assert not set(pool.names) & set(slab_files(os.getpid()))
    with pytest.raises(SlabError, match="is closed: create a new pool"):
        pool.acquire()
    with pytest.raises(SlabError, match="is closed"):
        pool.release(slot)


def test_slabs_have_no_name_in_any_file_system_and_go_with_the_pool():
    with SlabPool("w7", slot_bytes=100, slots=3, slots_per_slab=2) as pool:
        assert len(pool.names) == 2 and set(pool.names) <= set(slab_files(os.getpid()))
        assert not [name for name in os.listdir("/dev/shm") if name.startswith("vitserve-")]
        slot = pool.acquire()
        pool.array(slot, (3,), "float32")[:] = [1, 2, 3]
        assert SlabReader(opener(pool)).array(slot.slab, 0, slot.offset, (3,), "float32").tolist() == [1, 2, 3]
    gc.collect()
    assert not set(pool.names) & set(slab_files(os.getpid()))


def test_a_garbage_collected_pool_closes_its_slabs():
    pool = SlabPool("w5", 4096, 2)
    names = pool.names
    del pool
    gc.collect()
    assert not set(names) & set(slab_files(os.getpid())) and mappings_of(names[0]) == 0


def test_a_failed_construction_leaves_no_slab_open(monkeypatch):
    made = []

    def fail_on_the_second(name, size, prepare=None):
        if made:
            raise OSError(12, "Cannot allocate memory")
        made.append(name)
        return create_sealed(name, size, prepare)

    monkeypatch.setattr(slabs, "create_sealed", fail_on_the_second)
    with pytest.raises(OSError):
        SlabPool("w6", 4096, 4, slots_per_slab=2)
    gc.collect()
    assert made and not set(made) & set(slab_files(os.getpid())) and mappings_of(made[0]) == 0


def test_a_pool_of_descriptors_made_elsewhere_is_read_only_and_counts_them():
    with SlabPool("w3", 4096, 2) as maker:
        fd = os.dup(maker.descriptor(maker.names[0]))
        adopted = SlabPool("w3", 4096, 2, descriptors=[fd])
        assert adopted.descriptor(maker.names[0]) == fd and adopted.descriptor("other") is None
        slot = adopted.acquire()
        with pytest.raises(SlabError, match="made by their worker, which alone writes them"):
            adopted.array(slot, (4,), "float32")
        adopted.close()
        with pytest.raises(OSError):
            os.fstat(fd)  # the pool owned the descriptor and closed it
        with pytest.raises(SlabError, match="2 slab descriptors for a pool of 1 slabs"):
            SlabPool("w3", 4096, 2, descriptors=[1, 2])


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
def test_invalid_constructor_arguments_say_what_to_change(arguments: dict, message: str):
    before = slab_files(os.getpid())
    with pytest.raises(ValueError, match=message):
        SlabPool(**{"owner": "w0", "slot_bytes": 4096, "slots": 2, **arguments})
    assert slab_files(os.getpid()) == before


def test_hold_count_must_be_positive(pool: SlabPool):
    slot = pool.acquire()
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        pool.hold(slot, 0)
    assert pool.refcount(slot) == 1


def test_close_in_a_forked_child_leaves_the_parents_slabs(pool: SlabPool):
    child = os.fork()
    if child == 0:  # the child inherited the pool object; closing it there must not touch the parent's
        pool.close()
        os._exit(0)
    os.waitpid(child, 0)
    slot = pool.acquire()
    pool.array(slot, (2,), "float32")[:] = [1, 2]
    assert SlabReader(opener(pool)).array(slot.slab, 0, slot.offset, (2,), "float32").tolist() == [1, 2]


# -- runs of consecutive slots ----------------------------------------------------------------


def test_runs_are_first_fit_within_one_slab_and_free_together():
    with SlabPool("w1", slot_bytes=4096, slots=6, slots_per_slab=3) as pool:
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


class Slabs:
    """Sealed slabs as an engine's workers make them, without any mapping of them in this process."""

    def __init__(self):
        self.descriptors: dict[str, int] = {}

    def make(self, epoch: int, value: float, owner: str = "w0", pid: int | None = None) -> str:
        name = f"vitserve-{pid or os.getpid()}-{owner}-e{epoch}-0"
        fd, mapping = create_sealed(name, 4096)
        np.frombuffer(mapping, np.float32)[:] = value
        mapping.close()
        self.descriptors[name] = fd
        return name

    def open(self, name: str) -> int:
        if name not in self.descriptors:
            raise SlabError(f"no such slab: {name}")
        return os.dup(self.descriptors[name])

    def close(self) -> None:
        for fd in self.descriptors.values():
            os.close(fd)


@pytest.fixture
def made():
    made = Slabs()
    yield made
    made.close()


def test_a_reader_unmaps_an_older_epoch_once_a_newer_one_of_its_owner_is_mapped(made: Slabs):
    reader = SlabReader(made.open)
    old, other = made.make(0, 1.0), made.make(0, 3.0, owner="w1")
    old_view = reader.array(old, 0, 0, (4,), "float32")
    reader.array(other, 0, 0, (4,), "float32")
    new = made.make(1, 2.0)  # the worker restarted: its slabs have a new epoch
    assert reader.array(new, 1, 0, (4,), "float32").tolist() == [2.0] * 4
    assert old_view.tolist() == [1.0] * 4 and mappings_of(old) == 1  # a view handed out keeps it
    del old_view
    gc.collect()
    assert mappings_of(old) == 0
    assert mappings_of(other) == 1 and mappings_of(new) == 1  # another owner's stays
    again = reader.array(old, 0, 0, (4,), "float32")  # a result from before the restart still reads...
    assert again.tolist() == [1.0] * 4
    del again
    gc.collect()
    assert mappings_of(old) == 0  # ...but its mapping is not kept
    assert reader.array(new, 1, 0, (4,), "float32").tolist() == [2.0] * 4
    reader.close()
    assert mappings_of(new) == 0


def test_a_reader_unmaps_the_slabs_of_an_engine_once_one_of_a_newer_engine_is_mapped(made: Slabs):
    reader = SlabReader(made.open)
    first = made.make(0, 1.0)
    reader.array(first, 0, 0, (4,), "float32")
    # The engine restarted (a new process): the old one's slabs are gone for good, even at epoch 0.
    second = made.make(0, 2.0, owner="w1", pid=os.getpid() + 1)
    assert reader.array(second, 0, 0, (4,), "float32").tolist() == [2.0] * 4
    assert mappings_of(first) == 0 and mappings_of(second) == 1
    reader.close()
