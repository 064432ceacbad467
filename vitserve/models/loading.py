"""`load_model`: a local Hugging Face checkpoint directory or a `random:` preset."""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vitserve.preprocess.in_force import preprocess_for

from .fingerprint import TensorDigest, combine, tensor_digest
from .families import FAMILIES, family_of, supported, tower_of
from .presets import PRESET_PREFIX, init_random_, large_tower, preset_config, preset_model_type

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
HASH_THREADS = 4  # fingerprinting the weights as they are read (models/fingerprint.py)


class CheckpointError(ValueError):
    """The checkpoint directory cannot be loaded as a vision tower vitserve runs (models/families.py)."""


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention: str | None = None,
) -> nn.Module:
    """Load a vision tower (a `VisionEncoder`, protocol.py) in eval mode.

    `source` is a checkpoint directory (config.json plus *.safetensors, vision tensors under
    `model.visual.`, `visual.` or, for a saved bare tower, no prefix) or a preset such as
    `random:qwen3-vl-8b`. `dtype` defaults to bfloat16 on CUDA and float32 elsewhere.
    `attention` picks `flash_attn`, `torch_varlen` or `sdpa` (default: the best available).
    The tower's `preprocess` is the checkpoint's preprocessing (its preprocessor_config.json and
    video_preprocessor_config.json; the released values without them or for a preset), for
    `preprocess_image(image, model.preprocess)`; `weights_fingerprint` identifies its weights.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    check_source(source)
    if str(source).startswith(PRESET_PREFIX):
        config = preset_config(str(source))
        tower = tower_of(config)
        if large_tower(config) and device.type == "cuda":  # default initialisation is quick on a GPU
            with torch.device(device):
                model = tower(config)
        elif large_tower(config):  # none on the CPU (seconds): init_random_ draws every value
            with torch.device("meta"):  # (a first use of meta imports torch's reference ops: seconds, too)
                model = tower(config)
            model = model.to_empty(device="cpu")
        else:
            model = tower(config)
        model.weights_fingerprint = init_random_(model)
        model.model_type = preset_model_type(str(source))
        model.preprocess = preprocess_for(str(source))  # the released preprocessing of the preset's family
        model.to(device=device, dtype=dtype)
    else:
        directory = Path(source)
        config, bare, model_type = read_vision_config(directory)
        family = family_of(model_type, bare=bare)
        with torch.device("meta"):
            model = tower_of(config)(config)
        prefixes, owned = (("",), ()) if bare else (family.prefixes, family.owned)
        state, model.weights_fingerprint = read_vision_tensors(directory, model, prefixes, owned, device, dtype,
                                                               family.aliases)
        if family.adapt is not None:  # (after the fingerprint: that is of the tensors as stored)
            state = family.adapt(state, config)
        model.load_state_dict(state, strict=True, assign=True)
        model.model_type = model_type
        model.preprocess = preprocess_for(directory)
    model.eval().requires_grad_(False)
    model.select_attention(attention)
    log.info("loaded %s: %d layers, hidden %d, out %d, %s on %s, attention %s", source, config.depth,
             config.hidden_size, config.out_hidden_size, dtype, device, model.attention_backend)
    return model


def check_source(source: str | Path) -> None:
    """CheckpointError (a ValueError) at once, before any worker loads anything, when `source` cannot be
    a model: an unknown preset, a missing directory, a config.json of a tower vitserve does not run,
    or no safetensors."""
    if str(source).startswith(PRESET_PREFIX):
        try:
            preset_config(str(source))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return
    directory = Path(source)
    if not directory.is_dir():
        raise CheckpointError(f"model source {str(source)!r} is neither a checkpoint directory nor a preset "
                              f"({PRESET_PREFIX}<name>, e.g. {PRESET_PREFIX}tiny)")
    read_vision_config(directory)
    _tensor_files(directory)


def read_vision_config(directory: Path) -> tuple[object, bool, str]:
    """The tower's config, whether the directory holds a bare tower (no VLM around it), and its model_type."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: expected a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if "vision_config" in raw:
        if not isinstance(raw["vision_config"], dict):
            raise CheckpointError(f"{path}: vision_config must be a JSON object")
        family = family_of(model_type, bare=False)
        if family is None:
            raise CheckpointError(f"{path} has model_type {model_type!r}; vitserve loads these vision towers: "
                                  f"{supported()} (with a vision_config)")
        vision, bare = raw["vision_config"], False
    elif (family := family_of(model_type, bare=True)) is not None and ("depth" in raw or "num_hidden_layers" in raw):
        vision, bare = raw, True
    else:
        bare_types = [f.vision_model_types[0] for f in FAMILIES if f.vision_model_types]
        raise CheckpointError(
            f"{path} has model_type {model_type!r} and no vision_config of a tower vitserve runs; it loads "
            f"{supported()}; or a saved bare tower (model_type one of {bare_types})"
        )
    try:
        return family.config_from_hf(vision, str(model_type), raw), bare, model_type
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def _tensor_files(directory: Path) -> dict[str, str]:
    """Tensor name -> file name, from the shard index or the file headers."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {err}") from err
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return dict(weight_map)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors files (nor {INDEX_FILE})")
    names: dict[str, str] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                if name in names:
                    raise CheckpointError(f"tensor {name} is in both {names[name]} and {file.name} in {directory}")
                names[name] = file.name
    return names


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def _vision_names(directory: Path, files: dict[str, str], prefixes: tuple[str, ...],
                  owned: tuple[str, ...], aliases: tuple[tuple[str, str], ...] = ()) -> tuple[dict[str, str], str]:
    """The tower's tensors (the name in the model -> the name in the files), and the prefix to show
    missing ones under (none when each name may have its own)."""
    if owned:  # each name under any prefix (transformers writes some under `model.`, some not)
        vision: dict[str, str] = {}
        for name in files:
            for prefix in prefixes:
                short = name[len(prefix):]
                for stored, canonical in aliases:
                    if short.startswith(stored):
                        short = canonical + short[len(stored):]
                if name.startswith(prefix) and short.startswith(owned):
                    if short in vision:
                        raise CheckpointError(f"{directory} has {short} twice ({vision[short]} and {name}); keep one")
                    vision[short] = name
                    break
        if not vision:
            raise CheckpointError(f"{directory} has no vision tensors under {' or '.join(owned)}")
        return vision, ""
    found = [p for p in prefixes if any(name.startswith(p) for name in files)]
    if not found:
        raise CheckpointError(f"{directory} has no vision tensors under {' or '.join(prefixes)}")
    if len(found) > 1:
        raise CheckpointError(f"{directory} has vision tensors under both {found[0]} and {found[1]}; keep one copy")
    return {name[len(found[0]):]: name for name in files if name.startswith(found[0])}, found[0]


def read_vision_tensors(
    directory: Path, model: nn.Module, prefixes: tuple[str, ...], owned: tuple[str, ...], device: torch.device,
    dtype: torch.dtype, aliases: tuple[tuple[str, str], ...] = (),
) -> tuple[dict[str, torch.Tensor], str]:
    """Memory-map and read only the vision tensors (under the first of `prefixes` the files use, and of
    the names under it those starting with one of `owned`, or all), checking names and shapes against
    `model`; and their fingerprint (of the tensors as stored)."""
    files = _tensor_files(directory)

    vision, shown_prefix = _vision_names(directory, files, prefixes, owned, aliases)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(vision))
    extra = sorted(set(vision) - set(expected))
    if missing:
        shown = ", ".join(shown_prefix + m for m in missing[:8])
        raise CheckpointError(f"{directory} lacks {len(missing)} vision tensor(s) the config needs: {shown}")
    if extra:
        shown = ", ".join(f"{vision[e]} (in {files[vision[e]]})" for e in extra[:8])
        raise CheckpointError(f"{directory} has {len(extra)} vision tensor(s) the config does not use: {shown}")
    state: dict[str, torch.Tensor] = {}
    digests: dict[str, Future[TensorDigest]] = {}
    by_file: dict[str, list[str]] = {}
    for short, full in vision.items():
        by_file.setdefault(files[full], []).append(short)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as hashing:  # hashes while the next tensors are read
        for file_name, shorts in sorted(by_file.items()):
            path = directory / file_name
            if not path.is_file():
                raise CheckpointError(f"{directory / INDEX_FILE} names {file_name}, which does not exist")
            with _open_safetensors(path) as handle:
                present = set(handle.keys())
                for short in shorts:
                    full = vision[short]
                    if full not in present:
                        raise CheckpointError(f"{directory / INDEX_FILE} places {full} in {file_name}, which lacks it")
                    shape = tuple(handle.get_slice(full).get_shape())
                    if shape != expected[short]:
                        raise CheckpointError(
                            f"tensor {full} in {file_name} has shape {list(shape)}, but the config "
                            f"needs {list(expected[short])}"
                        )
                    stored = handle.get_tensor(full)
                    digests[short] = hashing.submit(tensor_digest, stored)
                    state[short] = stored.to(device=device, dtype=dtype)
    return state, combine({short: digest.result() for short, digest in digests.items()})
