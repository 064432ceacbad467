"""Helpers shared by the slab tests: reads in another process, result references."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from vitserve.ipc.direct import link_path
from vitserve.ipc.slab_channel import channel_path
from vitserve.ipc.slabs import SlabError, SlabPool, Slot
from vitserve.soak.resources import slab_sizes

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter given the slabs' descriptors: reads each reference with SlabReader and
# prints the values it saw.
READER_SCRIPT = """
import json, os, sys, warnings
import torch
from vitserve.ipc.slab_maps import SlabReader

request = json.loads(sys.argv[1])
reader = SlabReader(lambda name: os.dup(request["descriptors"][name]))
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


def opener(*pools: SlabPool):
    """What a SlabReader is given to open the slabs of `pools` (as the engine's own reader is)."""
    def open_slab(name: str) -> int:
        for pool in pools:
            if (fd := pool.descriptor(name)) is not None:
                return os.dup(fd)
        raise SlabError(f"no such slab: {name}")
    return open_slab


def read_in_another_process(pool: SlabPool, refs: list[dict]) -> list[dict]:
    descriptors = {name: pool.descriptor(name) for name in pool.names}
    request = json.dumps({"descriptors": descriptors, "refs": refs})
    done = subprocess.run([sys.executable, "-c", READER_SCRIPT, request], cwd=REPO_ROOT, pass_fds=list(descriptors.values()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference(slot: Slot, shape: tuple[int, ...], dtype: str) -> dict:
    return {"slab": slot.slab, "epoch": slot.epoch, "offset": slot.offset, "shape": list(shape), "dtype": dtype}


def slab_files(pid: int) -> list[str]:
    """The slabs (sealed memory files) that process `pid` holds a descriptor of. Collects garbage
    first: a mapping whose views are gone but not collected yet still holds its descriptor."""
    gc.collect()
    return sorted(slab_sizes(pid))


def socket_files_left(endpoint: str) -> list[str]:
    """The socket files of an ipc:// endpoint (its slab channel, its direct link) that are still there."""
    path = endpoint.removeprefix("ipc://")
    return [name for name in (path, channel_path(path), link_path(path))
            if endpoint.startswith("ipc://") and os.path.exists(name)]
