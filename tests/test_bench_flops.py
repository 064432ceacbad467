"""`vitserve bench`'s compute floor: the analytic FLOPs of each family's tower equal what torch's
FLOP counter counts in Hugging Face's tower (eager attention: its matmuls are counted too)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import transformers
from vitserve.bench.flops import tower_flops
from vitserve.bench.runner_bench import hf_grid_thw
from vitserve.bench.kimi_twin import kimi_twin
from vitserve.models import load_model
from vitserve.models.glm4v.config import Glm4vVisionConfig
from vitserve.models.kimi_k25.config import KimiK25VisionConfig
from vitserve.models.kimi_k25.model import KimiK25VisionTower
from vitserve.models.qwen3_vl.config import Qwen3VLVisionConfig

GRIDS = [(1, 4, 6), (2, 6, 4), (1, 10, 2)]
QWEN = dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48, num_position_embeddings=64)
GLM = dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=48, intermediate_size=80)


class Family:  # what hf_grid_thw reads of a model
    def __init__(self, model_type: str):
        self.model_type = ("glm4v" if model_type == "glm" else model_type)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5", "glm", "kimi"])
def test_the_analytic_flops_are_the_counted_flops_of_hf_tower(family):
    if family == "kimi":
        ours = KimiK25VisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                                   pos_emb_height=8, pos_emb_width=8)
        model = load_model("random:tiny-kimi")  # (any Kimi tower: hf_grid_thw reads its temporal pool)
        grid_thw = torch.tensor(GRIDS + [(6, 4, 4)])
        twin = kimi_twin(KimiK25VisionTower(ours), attention="eager")  # (eager: its matmuls are counted)
        pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 14 * 14)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            twin(pixel_values, grid_thw=hf_grid_thw(model, grid_thw))
        assert tower_flops(ours, grid_thw.tolist()) == pytest.approx(counter.get_total_flops(), rel=1e-6)
        return
    if family == "glm":
        ours = Glm4vVisionConfig(**GLM)
        hf_config, tower = transformers.Glm4vVisionConfig(**GLM), transformers.Glm4vVisionModel
    elif family == "qwen3_5":
        ours = Qwen3VLVisionConfig(**QWEN, deepstack_visual_indexes=())
        hf_config, tower = transformers.Qwen3_5VisionConfig(**QWEN), transformers.Qwen3_5VisionModel
    else:
        ours = Qwen3VLVisionConfig(**QWEN, deepstack_visual_indexes=(0, 1))
        hf_config = transformers.Qwen3VLVisionConfig(**QWEN, deepstack_visual_indexes=[0, 1])
        tower = transformers.Qwen3VLVisionModel
    model = tower._from_config(hf_config, attn_implementation="eager").eval()
    patch_dim = 3 * ours.temporal_patch_size * ours.patch_size**2
    grid_thw = torch.tensor(GRIDS)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), patch_dim)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(pixel_values, grid_thw=hf_grid_thw(Family(family), grid_thw))
    assert tower_flops(ours, GRIDS) == pytest.approx(counter.get_total_flops(), rel=1e-6)
