"""GLM-4.xV's position taps: its learned table sampled as `grid_sample(mode="bicubic",
align_corners=False, padding_mode="border")` samples it at each patch centre, as 16 (index,
weight) taps so that the sum runs in a graph with static shapes.

Per axis: the patch centre (i + 0.5) / size is mapped to the table's pixel coordinate
x = ((2 (i + 0.5) / size - 1) + 1) * side / 2 - 0.5 with the reference's float32 operations, and the
four taps floor(x) - 1 .. floor(x) + 2 get Keys' cubic weights with a = -0.75 (torch's), their
indexes clamped to the table (border padding).
"""

from __future__ import annotations

import torch

CUBIC_A = -0.75  # torch's bicubic (grid_sample and interpolate), not Pillow's -0.5


def cubic_weights(fraction: torch.Tensor) -> torch.Tensor:
    """Keys' weights of the taps at -1, 0, +1, +2 from floor(x), for x's fractional part: (tokens, 4)."""
    a = CUBIC_A

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(fraction + 1), near(fraction), near(1 - fraction), far(2 - fraction)], dim=-1)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    normalised = (index.to(torch.float32) + 0.5) / size.to(torch.float32) * 2 - 1  # (tokens,) in [-1, 1]
    source = ((normalised + 1) * side - 1) / 2  # (tokens,) table pixel coordinate (align_corners=False)
    floor = source.floor()
    offsets = torch.arange(-1, 3, device=index.device)  # a kernel, not a host-to-device copy
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)  # (tokens, 4)
    return taps, cubic_weights(source - floor)  # (tokens, 4) each


def bicubic_taps(
    row: torch.Tensor, col: torch.Tensor, height: torch.Tensor, width: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    row_taps, row_weights = _axis_taps(row, height, side)
    col_taps, col_weights = _axis_taps(col, width, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 16)  # (tokens, 16)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 16)  # (tokens, 16)
    return index, weight
