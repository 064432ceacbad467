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

import torch

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


def read_cost(path: Path) -> CostModel | None:
    """The kept cost model, or None (none kept, or unreadable: it is measured again)."""
    try:
        lists = json.loads(path.read_text())
        return CostModel.from_lists(lists["attention_ms_per_token2"], lists["padded_base_ms"],
                                    lists["eager_base_points"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the kept cost model %s (%s): measuring it again", path, err)
        return None


def write_cost(path: Path, cost: CostModel) -> None:
    """Keep the cost model (atomically: a reader sees the old file or the new one). A cache that
    cannot be written is logged, never fatal."""
    attention, padded, eager = cost.to_lists()
    text = json.dumps({"attention_ms_per_token2": attention, "padded_base_ms": padded, "eager_base_points": eager})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".cost-", delete=False) as temporary:
            temporary.write(text)
        os.replace(temporary.name, path)
    except OSError as err:
        log.warning("cannot keep the cost model in %s (%s): the next start measures it again", path, err)
