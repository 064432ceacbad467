"""The fingerprint of a tower's weights (vitserve.models.fingerprint): what `load_model` reports for
checkpoints Hugging Face wrote and for presets equals the fingerprint of the decoder's own tower in
the stored dtype, whatever the layout and the serving dtype; any changed weight or stored dtype
changes it; and an engine refuses workers whose weights differ."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitserve.engine.outputs_layout import agreed_capacities
from vitserve.ipc.worker_messages import WorkerCost, WorkerReady
from vitserve.models import load_model
from vitserve.models.fingerprint import weights_fingerprint

from hf_checkpoints import (  # noqa: F401 (fixtures are used by name)
    bare_checkpoint,
    copy_checkpoint,
    full_checkpoint,
    visual_prefix_checkpoint,
)


def test_a_checkpoint_has_its_decoder_towers_fingerprint_in_every_layout(
        bare_checkpoint, full_checkpoint, visual_prefix_checkpoint):
    fingerprints = {}
    for name, (directory, hf_state) in {"bare": bare_checkpoint, "sharded model.visual.": full_checkpoint,
                                        "visual.": visual_prefix_checkpoint}.items():
        model = load_model(directory)
        assert model.weights_fingerprint == weights_fingerprint(hf_state.items()), name
        assert model.model_type == json.loads((directory / "config.json").read_text())["model_type"], name
        fingerprints[name] = model.weights_fingerprint
    assert fingerprints["sharded model.visual."] == fingerprints["visual."]  # the same weights, laid out twice
    assert fingerprints["bare"] != fingerprints["visual."]  # another tower's


def test_the_serving_dtype_does_not_change_the_fingerprint(full_checkpoint):
    directory, _ = full_checkpoint
    assert (load_model(directory, dtype=torch.bfloat16).weights_fingerprint
            == load_model(directory).weights_fingerprint)
    preset = load_model("random:tiny")
    assert load_model("random:tiny", dtype=torch.bfloat16).weights_fingerprint == preset.weights_fingerprint
    assert preset.weights_fingerprint == weights_fingerprint(preset.state_dict().items())  # float32, as drawn


@pytest.mark.parametrize("change", ["one value", "stored dtype", "a tensor's shape"])
def test_any_change_to_the_stored_weights_changes_the_fingerprint(bare_checkpoint, tmp_path, change):
    directory, hf_state = bare_checkpoint
    target = copy_checkpoint(directory, tmp_path)
    tensors = load_file(target / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    if change == "one value":
        tensors[name].view(-1)[7] += 1e-3
    elif change == "stored dtype":
        tensors = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    else:  # the same bytes, another shape: weights_fingerprint on (name, shape) catches it
        flat = {n: t.reshape(-1) for n, t in hf_state.items()}
        assert weights_fingerprint(flat.items()) != weights_fingerprint(hf_state.items())
        return
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    changed = load_model(target).weights_fingerprint
    assert changed != weights_fingerprint(hf_state.items())
    assert changed == weights_fingerprint(tensors.items())  # the stored tensors', as they are now


def _ready(worker: int, fingerprint: str) -> WorkerReady:
    return WorkerReady(worker=worker, device="cpu", budgets=(64, 128), max_items=8, max_sequences=8, merge_factor=4,
                       out_hidden=128, num_deepstack=2, dtype="float32", model_type="qwen3_vl",
                       fingerprint=fingerprint, cost=WorkerCost(0.0, [], []), ready_s=0.1)


def test_workers_serving_other_weights_are_refused():
    agreed_capacities([_ready(0, "a" * 32), _ready(1, "a" * 32)])
    with pytest.raises(RuntimeError, match="serve different models"):
        agreed_capacities([_ready(0, "a" * 32), _ready(1, "b" * 32)])
