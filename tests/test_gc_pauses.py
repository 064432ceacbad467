"""freeze_start_up_objects: what lives at start-up leaves the collector's passes; garbage is still
freed, both what existed before the freeze and what comes after."""

import gc
import weakref

import pytest

from vitserve.gc_pauses import freeze_start_up_objects


class Node:
    def __init__(self):
        self.other = self  # a cycle: only the collector frees it


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the test session keeps the collector as it was


def test_live_objects_are_frozen_and_garbage_is_freed(unfrozen):
    kept = Node()
    dropped = Node()
    dropped_ref = weakref.ref(dropped)
    del dropped
    before = gc.get_freeze_count()
    frozen = freeze_start_up_objects()
    assert dropped_ref() is None, "garbage alive at the freeze must be freed, not frozen for good"
    # (a frozen object freed since, by another thread of the test session, lowers the count again)
    assert gc.get_freeze_count() <= frozen and frozen > before
    walked = [o for g in range(3) for o in gc.get_objects(generation=g)]
    assert not any(o is kept for o in walked), "an object alive at the freeze is out of the collector's passes"
    later = Node()
    later_ref = weakref.ref(later)
    del later
    gc.collect()
    assert later_ref() is None, "cycles made after the freeze are still collected"
    assert kept.other is kept
