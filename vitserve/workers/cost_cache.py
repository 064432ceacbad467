"""The measured cost model, kept on disk between starts: measuring it takes seconds a worker does
not need to spend twice on the same machine, model architecture and window settings.

An entry's name is a hash of everything the timings depend on (the tower's architecture, dtype,
attention backend, device, torch version, capacities, graphs or not, CPU threads), so a change of
any of them measures anew. The scheduler corrects a slightly-off model from what completions show
(scheduler/learning.py), so a machine whose clocks drifted since is still served well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import msgspec
import torch

from vitserve.ipc.worker_messages import WorkerCost

from .cost_model import CostModel

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cost model or its measurement changes meaning


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitserve"


def cost_cache_path(directory: Path, runner) -> Path:
    """Where the cost model of `runner` (a ModelRunner) is kept in `directory`."""
    model, device = runner.model, runner.device
    caps = runner.capacities
    key = {
        "format": FORMAT, "torch": torch.__version__, "architecture": repr(model.config), "dtype": str(runner.dtype),
        "attention": getattr(model, "attention_backend", None), "graphs": runner.use_graphs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "budgets": caps.budgets, "max_items": caps.max_items, "max_sequences": caps.max_sequences,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return directory / "cost" / f"{digest}.json"


def read_cost(path: Path | None, runner) -> CostModel | None:
    """The cost model kept at `path` for `runner`, or None (nothing kept, or unreadable, or not
    covering the runner's shapes: it is measured again)."""
    if path is None:
        return None
    try:
        cost = CostModel.from_message(msgspec.json.decode(path.read_bytes(), type=WorkerCost))
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as err:
        log.warning("ignoring the kept cost model %s (%s): measuring it again", path, err)
        return None
    return cost if set(runner.padded_shapes()) <= set(cost.padded_base_ms) else None


def write_cost(path: Path | None, cost: CostModel) -> None:
    """Keep the cost model at `path` (atomically: a reader sees the old file or the new one; None:
    nowhere). A cache that cannot be written is logged, never fatal."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=".cost-", delete=False) as temporary:
            temporary.write(msgspec.json.encode(WorkerCost(*cost.to_lists())))
        os.replace(temporary.name, path)
    except OSError as err:
        log.warning("cannot keep the cost model in %s (%s): the next start measures it again", path, err)
