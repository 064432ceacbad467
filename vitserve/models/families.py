"""The tower families vitserve runs, by Hugging Face model_type: which tower class and config each
checkpoint gets. Everything past loading goes through the encoder protocol (protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .glm4v.config import Glm4vVisionConfig
from .glm4v.model import Glm4vVisionTower
from .kimi_k25.config import KimiK25VisionConfig
from .kimi_k25.model import KimiK25VisionTower
from .kimi_k25.weights import to_rotate_half
from .qwen3_vl.config import Qwen3VLVisionConfig
from .qwen3_vl.model import Qwen3VLVisionTower


@dataclass(frozen=True)
class Family:
    name: str  # for messages and the README
    full_model_types: tuple[str, ...]  # config.json of the whole VLM, with a vision_config
    vision_model_types: tuple[str, ...]  # config.json of a saved bare tower
    config_from_hf: Callable[[dict[str, Any], str, dict[str, Any]], Any]  # (vision_config, model_type, config.json)
    tower: Callable[[Any], nn.Module]
    # where a whole model's checkpoint keeps the tower's tensors: without `owned`, under the first of
    # `prefixes` the files use; with it, the names starting with one of `owned`, each under any prefix
    prefixes: tuple[str, ...] = ("model.visual.", "visual.")
    owned: tuple[str, ...] = ()
    adapt: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None  # (state, config): what loading changes
    aliases: tuple[tuple[str, str], ...] = ()  # (stored start, the model's start) of names written two ways


def _qwen3_vl_config(vision: dict[str, Any], model_type: str, whole: dict[str, Any]) -> Qwen3VLVisionConfig:
    if model_type.startswith("qwen3_5") and "deepstack_visual_indexes" not in vision:
        vision = {**vision, "deepstack_visual_indexes": []}  # Qwen3.5's tower has none (Qwen3-VL's default is three)
    return Qwen3VLVisionConfig.from_hf(vision)


FAMILIES = (
    # Qwen3.5 is the Qwen3-VL tower without deepstack
    Family("Qwen3-VL and Qwen3.5", ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
           ("qwen3_vl_vision", "qwen3_vl", "qwen3_vl_moe", "qwen3_5_vision", "qwen3_5_moe_vision", "qwen3_5",
            "qwen3_5_moe"),
           _qwen3_vl_config, Qwen3VLVisionTower),
    # GLM-4.5V (glm4v_moe) and GLM-4.6V (glm46v) run GLM-4.1V's tower
    Family("GLM-4.1V, GLM-4.5V and GLM-4.6V", ("glm4v", "glm4v_moe", "glm46v"),
           ("glm4v_vision", "glm4v_moe_vision"),
           lambda vision, model_type, whole: Glm4vVisionConfig.from_hf(vision), Glm4vVisionTower),
    # The projector runs with the tower (its rows are the text model's width): a bare tower, without
    # it, is not served. The released names (transformers writes them too, some under `model.`).
    Family("Kimi K2.5", ("kimi_k25",), (), lambda vision, model_type, whole: KimiK25VisionConfig.from_hf(vision, whole),
           KimiK25VisionTower, prefixes=("", "model."), owned=("vision_tower.", "mm_projector."),
           adapt=to_rotate_half,
           # (transformers writes the patch embedding under the encoder, the released files beside it)
           aliases=(("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),)),
)


def family_of(model_type: object, *, bare: bool) -> Family | None:
    """The family of a checkpoint's model_type (of a whole VLM, or of a bare tower's config)."""
    for family in FAMILIES:
        if model_type in (family.vision_model_types if bare else family.full_model_types):
            return family
    return None


def tower_of(config: object) -> Callable[[Any], nn.Module]:
    """The tower class that takes `config`."""
    if isinstance(config, KimiK25VisionConfig):
        return KimiK25VisionTower
    return Glm4vVisionTower if isinstance(config, Glm4vVisionConfig) else Qwen3VLVisionTower


def supported() -> str:
    """The model types loadable, for messages."""
    return "; ".join(f"{f.name}: model_type one of {list(f.full_model_types)}" for f in FAMILIES)
