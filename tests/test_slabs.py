"""Output slabs: slot leasing and reference counts, cross-process reads, stale references and cleanup."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest
import torch

from slab_helpers import opener, read_in_another_process, reference

from vitserve.ipc.sealed import SEALS
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabError, SlabPool, Slot, numpy_dtype


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


def test_slot_from_another_epoch_is_rejected_naming_the_slot():
    with SlabPool("w0", 4096, 2, epoch=0) as old, \
            SlabPool("w0", 4096, 2, epoch=1) as new:
        stale = old.acquire()
        new.acquire()
        for operation in (new.release, new.hold, new.refcount):
            with pytest.raises(SlabError, match=rf"slab {stale.slab}, epoch 0, offset 0\) is from epoch 0 .*epoch 1"):
                operation(stale)
        assert old.release(stale) is True


def test_slot_from_another_pool_of_the_same_epoch_is_rejected():
    with SlabPool("w0", 4096, 2) as first, SlabPool("w1", 4096, 2) as second:
        foreign = first.acquire()
        second.acquire()
        with pytest.raises(SlabError, match="does not belong to this pool"):
            second.release(foreign)
        with pytest.raises(SlabError, match="does not belong to this pool"):
            second.release(Slot(99, second.names[0], 0, 0))


# -- layout and views --------------------------------------------------------------------------


def test_slots_span_several_page_aligned_sealed_slabs():
    with SlabPool("w0", slot_bytes=1000, slots=5, slots_per_slab=2) as pool:
        assert pool.slot_bytes == 4096
        assert pool.names == [f"vitserve-{os.getpid()}-w0-e0-{i}" for i in range(3)]
        assert [os.fstat(pool.descriptor(name)).st_size for name in pool.names] == [8192, 8192, 4096]
        assert all(fcntl.fcntl(pool.descriptor(name), fcntl.F_GET_SEALS) & SEALS == SEALS for name in pool.names)
        assert not any(name.startswith("vitserve-") for name in os.listdir("/dev/shm"))  # nothing to open by name
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


def test_another_process_reads_exactly_what_was_written_including_bfloat16():
    with SlabPool("w0", slot_bytes=4096, slots=3, slots_per_slab=1, epoch=7) as pool:
        floats, bf16, small = pool.acquire(), pool.acquire(), pool.acquire()
        float_values = np.arange(24, dtype=np.float32).reshape(4, 6) / 3
        pool.array(floats, (4, 6), "float32")[:] = float_values
        bf16_values = torch.tensor([[1.5, -2.25, 3e-3], [1e4, 0.0, -7.0]], dtype=torch.bfloat16)
        torch.from_numpy(pool.array(bf16, (2, 3), "bfloat16")).view(torch.bfloat16).copy_(bf16_values)
        pool.array(small, (5,), np.int8)[:] = [-3, -1, 0, 1, 127]

        seen = read_in_another_process(pool, [
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


def test_reader_views_in_place_read_only_and_maps_each_slab_once(pool: SlabPool):
    slot = pool.acquire()
    written = pool.array(slot, (8,), "int32")
    written[:] = np.arange(8)
    reader = SlabReader(opener(pool))
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


def test_reader_rejects_a_stale_epoch(pool: SlabPool):
    slot = pool.acquire()
    with pytest.raises(SlabError, match=r"stale reference: slab .*-e0-0 belongs to epoch 0, the reference to epoch 1"):
        SlabReader(opener(pool)).array(slot.slab, 1, slot.offset, (4,), "float32")


def test_reader_reports_a_missing_slab(pool: SlabPool):
    with pytest.raises(SlabError, match="no such slab"):
        SlabReader(opener(pool)).array(f"vitserve-{os.getpid()}-w9-e0-0", 0, 0, (4,), "float32")


def test_reader_rejects_names_that_are_not_vitserve_slabs(pool: SlabPool):
    for name in ("../etc/passwd", "vitserve-12-w-0-e0-0", "vitserve-012-w0-e0-0", "other"):
        with pytest.raises(SlabError, match="is not a vitserve slab name"):
            SlabReader(opener(pool)).array(name, 0, 0, (1,), "uint8")


def test_reader_refuses_a_file_without_seals(pool: SlabPool):
    """A descriptor that could be truncated or rewritten under a view (a plain file, a memfd without
    seals) is not mapped: a reader's views must never die of SIGBUS."""
    plain = os.memfd_create("vitserve-plain")
    os.ftruncate(plain, 4096)
    try:
        reader = SlabReader(lambda name: os.dup(plain))
        with pytest.raises(SlabError, match="lacks seals"):
            reader.array(pool.names[0], 0, 0, (4,), "float32")
    finally:
        os.close(plain)


def test_reader_rejects_out_of_bounds_references(pool: SlabPool):
    slot = pool.acquire()
    reader = SlabReader(opener(pool))
    assert reader.array(slot.slab, 0, 4096 * 4 - 4, (1,), "float32").shape == (1,)  # the very end still fits
    for offset, shape in ((4096 * 4 - 4, (2,)), (-4, (1,)), (4096 * 4, (1,))):
        with pytest.raises(SlabError, match=f"at offset {offset} do not fit in slab {slot.slab} of 16384 bytes"):
            reader.array(slot.slab, 0, offset, shape, "float32")


def test_forget_keeps_handed_out_views_valid_and_maps_again_on_next_use(pool: SlabPool):
    slot = pool.acquire()
    pool.array(slot, (4,), "float64")[:] = [1, 2, 3, 4]
    reader = SlabReader(opener(pool))
    view = reader.array(slot.slab, 0, slot.offset, (4,), "float64")
    reader.forget(slot.slab)
    reader.forget(slot.slab)  # forgetting an unmapped slab is a no-op
    assert view.tolist() == [1, 2, 3, 4]
    assert reader.array(slot.slab, 0, slot.offset, (4,), "float64").tolist() == [1, 2, 3, 4]
    reader.close()
    assert view.tolist() == [1, 2, 3, 4]
