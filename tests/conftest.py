"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest

from vitserve.ipc.slabs import SlabPool


@pytest.fixture
def pool():
    with SlabPool("w0", slot_bytes=4096, slots=4) as pool:
        yield pool
