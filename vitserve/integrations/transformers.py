"""Hugging Face transformers: a loaded Qwen3-VL, Qwen3.5, GLM-4.xV or Kimi K2.5 model takes its image
and video features from vitserve.

    model = Qwen3VLForConditionalGeneration.from_pretrained(path)
    attach(model, "ipc:///run/user/1000/vitserve.sock")  # or a vitserve.Client, or EngineConfig(model=path)
    print(verify(model))                                  # is the served tower the model's own?
    model.generate(**processor(text=..., images=..., videos=..., return_tensors="pt"))  # unchanged

`attach` replaces the model's `get_image_features` and `get_video_features` (the two places its
forward turns pixel values into features): the processor's pixel values go to vitserve as
processed items, and the rows and deepstack features come back in the model's device and dtype.
Everything else of the model (placeholders, positions, the language model) is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitserve.engine import EngineConfig
from vitserve.models.fingerprint import weights_fingerprint
from vitserve.preprocess import PreprocessConfig, preprocess_image

from .embedded import EmbeddedEncoder

# The largest relative difference (to the reference's largest value) between the served tower and
# the model's own on the same patches: packing and kernels differ, the weights must not.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
PROBE_SHAPE = (224, 320)  # the probe image verify encodes both ways (height, width)


@dataclass
class Attached:
    """What `attach` did to a model: the encoder it uses (closed by `detach` when attach made it)."""

    encoder: Any  # vitserve.Client or EmbeddedEncoder: `encode(items)` and `model`
    owned: bool


def attach(model: torch.nn.Module, encoder: Any) -> Attached:
    """Have `model` (a Qwen3-VL, Qwen3.5, GLM-4.xV or Kimi K2.5 model of transformers: ...ForConditionalGeneration
    or ...Model)
    take its image and video features from `encoder`: an endpoint (a `vitserve.Client` is made), a
    `vitserve.Client`, or an `EngineConfig` (an engine is started in this process). ValueError
    when the served model's outputs do not fit the decoder's."""
    inner = _vision_owner(model)
    detach(model)
    owned = isinstance(encoder, (str, EngineConfig))
    if isinstance(encoder, str):
        from vitserve import Client

        encoder = Client(encoder)
    elif isinstance(encoder, EngineConfig):
        encoder = EmbeddedEncoder(encoder)
    try:
        _check_outputs(encoder.model, inner)
    except ValueError:
        if owned:
            encoder.close()
        raise
    # Instance attributes (the class's methods stay as they are), with the parameter names of the
    # methods they stand for: generate() picks their arguments out of its inputs by those names.
    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **_: Any):
        return _features(encoder, inner, pixel_values, image_grid_thw)

    def get_video_features(pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None, **_: Any):
        return _features(encoder, inner, pixel_values_videos, video_grid_thw)

    inner.get_image_features, inner.get_video_features = get_image_features, get_video_features
    inner._vitserve = attached = Attached(encoder, owned)
    return attached


def detach(model: torch.nn.Module) -> None:
    """Undo `attach`: the model's own tower computes its features again."""
    inner = _vision_owner(model)
    attached = inner.__dict__.pop("_vitserve", None)
    if attached is None:
        return
    del inner.get_image_features, inner.get_video_features
    if attached.owned:
        attached.encoder.close()


@dataclass
class Verification:
    ok: bool
    relative_error: float  # the largest difference over the reference's largest value (inf: shapes differ)
    tolerance: float
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.message


def verify(model: torch.nn.Module, encoder: Any = None) -> Verification:
    """Encode a probe image with the model's own tower and with `encoder` (default: the attached one)
    and say whether they agree within the coarser dtype's tolerance; and whether the weights'
    fingerprints are equal (they are when the model holds the checkpoint's weights in their stored dtype)."""
    inner = _vision_owner(model)
    if encoder is None:
        attached = inner.__dict__.get("_vitserve")
        if attached is None:
            raise ValueError("verify needs an encoder: attach(model, ...) first, or pass encoder=")
        encoder = attached.encoder
    served, visual = encoder.model, _tower(inner)
    patches = preprocess_image(_probe_image(), PreprocessConfig(**served.preprocess))
    reference = _own_features(inner, patches.pixel_values, patches.grid_thw)  # (1 + deepstack, rows, out_hidden)
    with encoder.encode([(patches.pixel_values, patches.grid_thw)]) as result:  # (1 + deepstack, rows, out_hidden)
        item = result.items[0]
        theirs = torch.cat([item.embeddings[None], item.deepstack]).float().cpu()
    coarser = max((visual.dtype, getattr(torch, served.dtype)), key=lambda dtype: TOLERANCES.get(dtype, 1.0))
    tolerance = TOLERANCES.get(coarser, 4e-2)
    if theirs.shape != reference.shape:
        error = float("inf")
    else:
        error = ((theirs - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
    ok = error <= tolerance
    fingerprint = weights_fingerprint(_stored_weights(inner).items())
    same = ("equal" if fingerprint == served.fingerprint else
            f"differs (served {served.fingerprint or 'unknown'}, this model's {fingerprint}: other weights, or the "
            f"same ones in another dtype than stored)")
    message = (f"the served tower ({served.source}, {served.model_type}, {served.dtype}) "
               f"{'matches' if ok else 'does NOT match'} this model's ({visual.dtype}): largest relative difference "
               f"{error:.2e} on a {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe image, tolerance {tolerance:.0e}; "
               f"weights' fingerprint {same}")
    return Verification(ok, error, tolerance, message)


def _tower(inner: torch.nn.Module) -> torch.nn.Module:
    """The model's vision tower: `visual` (Qwen3-VL, Qwen3.5, GLM-4.xV) or `vision_tower` (Kimi K2.5)."""
    return inner.visual if hasattr(inner, "visual") else inner.vision_tower


def _stored_weights(inner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights as the checkpoint's files name and lay them out (what the served fingerprint is
    of): Qwen's and GLM's as they are; Kimi K2.5's tower and projector renamed back and their q and k rows
    permuted back (transformers converts both at load)."""
    if hasattr(inner, "visual"):
        return inner.visual.state_dict()
    from vitserve.models.kimi_k25.hf_names import from_transformers
    from vitserve.models.kimi_k25.weights import to_interleaved

    held = {f"vision_tower.{name}": t for name, t in inner.vision_tower.state_dict().items()}
    held |= {f"mm_projector.{name}": t for name, t in inner.mm_projector.state_dict().items()}
    config = inner.vision_tower.config
    return to_interleaved(from_transformers(held), config.num_attention_heads,
                          config.hidden_size // config.num_attention_heads)


def _own_features(inner, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The model's own features of processed patches, (1 + deepstack, rows, out_hidden) float32 on the CPU."""
    tower = _tower(inner)
    with torch.no_grad():
        if hasattr(inner, "visual"):
            own = tower(pixel_values.to(tower.device, tower.dtype), grid_thw=grid_thw.to(tower.device), return_dict=True)
            features = [own.pooler_output, *(getattr(own, "deepstack_features", None) or [])]  # (Qwen3.5: no deepstack)
        else:  # Kimi K2.5: the tower, then its projector (the class's method: attach may stand in for the instance's)
            patch = tower.config.patch_size
            patches = pixel_values.to(tower.device, tower.dtype).view(-1, 3, patch, patch)  # (tokens, C, P, P)
            own = type(inner).get_image_features(inner, patches, grid_thw.to(tower.device), return_dict=True)
            features = [torch.cat(own.pooler_output)]
    return torch.stack(features).float().cpu()


def _features(encoder, inner, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """The model's features of these items through vitserve: per item its rows and, per deepstack
    layer, its deepstack rows, in the model's device and dtype (copied out of shared memory)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    grids = [tuple(int(x) for x in grid) for grid in grid_thw.tolist()]
    values = pixel_values.detach().to("cpu", torch.float32).flatten(1)  # (tokens, patch_dim), the processor's
    pieces = values.split([t * h * w for t, h, w in grids])
    device, dtype = _tower(inner).device, _tower(inner).dtype
    with encoder.encode([(piece, np.array([grid])) for piece, grid in zip(pieces, grids)]) as result:
        rows = tuple(item.embeddings.to(device, dtype, copy=True) for item in result.items)  # (rows, out_hidden) each
        layers = result.items[0].deepstack.shape[0] if result.items else 0
        deepstack = [tuple(item.deepstack[layer].to(device, dtype, copy=True) for item in result.items)
                     for layer in range(layers)]
    return BaseModelOutputWithDeepstackFeatures(pooler_output=rows, deepstack_features=deepstack)


def _vision_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward calls get_image_features (e.g. Qwen3VLModel), given it or the model around it."""
    inner = getattr(model, "model", model)
    if not ((hasattr(inner, "visual") or hasattr(inner, "vision_tower")) and hasattr(inner, "get_image_features")):
        raise TypeError(f"{type(model).__name__} is not a Qwen3-VL, Qwen3.5, GLM-4.xV or Kimi K2.5 model of transformers "
                        "(no vision tower and get_image_features): pass e.g. a Qwen3VLForConditionalGeneration")
    return inner


def _check_outputs(served, inner: torch.nn.Module) -> None:
    if hasattr(inner, "visual"):
        vision = inner.visual.config
        wanted = (vision.out_hidden_size, len(getattr(vision, "deepstack_visual_indexes", None) or []))
    else:  # Kimi K2.5: the projector's rows go into the text stream
        wanted = (inner.config.text_config.hidden_size, 0)
    if (served.out_hidden, served.num_deepstack) != wanted:
        raise ValueError(f"the served model ({served.source}) gives rows of width {served.out_hidden} with "
                         f"{served.num_deepstack} deepstack layers; this model takes {wanted[0]} with {wanted[1]}: "
                         "serve the checkpoint this decoder belongs to")


def _probe_image() -> np.ndarray:
    """A fixed image with smooth and sharp content (every call the same)."""
    height, width = PROBE_SHAPE
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 64, (height, width, 3))
    image = np.stack([rows * 255 / height, cols * 255 / width, (rows + cols) % 256], axis=-1) * 0.75 + noise
    return image.clip(0, 255).astype(np.uint8)  # (H, W, 3)
