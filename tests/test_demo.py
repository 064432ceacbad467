"""The Quickstart's main command: `vitserve demo` starts the engine, encodes the demo items through a
client and shows where their rows are and how they were packed, then stops the engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_readme import quickstart_commands

from vitserve.cli import DEMO_IMAGE_SIZES


def test_the_demo_serves_the_demo_items_and_stops_its_engine():
    assert quickstart_commands()[0].endswith("vitserve demo")
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "demo"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("demo-")]
    assert len(rows) == len(DEMO_IMAGE_SIZES) + 1  # each image and the video, one line each
    assert all(re.search(r"/dev/shm/vitserve-\S+ at byte \d+$", line) for line in rows)
    assert "1x16x16" in rows[0] and "64 x 128" in rows[0]  # 224x224: 16x16 patches, merged 2x2 into 64 rows
    packed = re.search(r"(\d+) items in (\d+) windows", done.stdout)
    assert packed and int(packed.group(1)) == len(rows) and 1 <= int(packed.group(2)) < len(rows)
    slab = re.search(r"(/dev/shm/vitserve-\S+) at byte", rows[0]).group(1)
    assert not Path(slab).exists()  # the engine stopped and removed its slabs
