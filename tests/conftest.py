"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitserve.ipc.slabs import SlabPool


@pytest.fixture
def pool(tmp_path: Path):
    with SlabPool("w0", slot_bytes=4096, slots=4, directory=tmp_path) as pool:
        yield pool
