"""Image and video to patches, compatible with the Hugging Face Qwen3-VL, GLM-4.xV and Kimi K2.5 processors."""

from vitserve.preprocess.api import Patches, preprocess_batch, preprocess_image, preprocess_video
from vitserve.preprocess.config import PreprocessConfig, released_preprocess
from vitserve.preprocess.errors import PreprocessError
from vitserve.preprocess.geometry import ItemPlan, plan_image, plan_video

__all__ = [
    "ItemPlan",
    "Patches",
    "PreprocessConfig",
    "PreprocessError",
    "preprocess_batch",
    "preprocess_image",
    "preprocess_video",
    "plan_image",
    "plan_video",
    "released_preprocess",
]
