"""Helpers shared by the slab tests: reads in another process, result references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vitserve.ipc.slabs import SHM_DIR, Slot, parse_slab_name

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


def slab_files(pid: int) -> list[str]:
    """The /dev/shm slab files that the engine process `pid` created."""
    return [name for name in os.listdir(SHM_DIR) if (parsed := parse_slab_name(name)) and parsed[0] == pid]
