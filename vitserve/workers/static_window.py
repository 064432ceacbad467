"""The static buffers of one window and the forward pass over them.

One set of buffers, sized for the largest budget, serves every budget: a budget's forward
reads and writes prefixes of them, so a captured graph of any budget replays on whatever was
staged. Per window the host writes the packed pixels and the small layout (one row per item);
everything per token is computed from the layout inside the forward.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vitserve.models import VisionEncoder

from .capacities import Capacities
from .packing import Window

STAGING_DEPTH = 4  # layouts in flight before a pinned staging slot is reused


class StaticWindow:
    def __init__(self, model: VisionEncoder, capacities: Capacities, device: torch.device, dtype: torch.dtype):
        geometry = model.geometry
        self.model = model
        self.capacities = capacities
        self.device = device
        self.merge = geometry.merge_factor
        # Segment slots: every real one, plus one for the padding tokens.
        self.sequence_slots = capacities.max_sequences + 1
        budget = capacities.max_budget
        self.pixels = torch.zeros(budget, geometry.patch_dim, dtype=dtype, device=device)  # (tokens, C*T*P*P)
        self.layout = torch.zeros(capacities.max_items, 5, dtype=torch.int64, device=device)  # (items, 5)
        outputs = 1 + geometry.num_deepstack
        # Row-major per output token, so the used prefix (and each item) is one contiguous block.
        self.output = torch.zeros(budget // self.merge, outputs, geometry.out_hidden_size, dtype=dtype,
                                  device=device)  # (tokens / merge², 1 + deepstack, out_hidden)
        pin = device.type == "cuda"
        self._staging = torch.zeros(STAGING_DEPTH, capacities.max_items, 5, dtype=torch.int64, pin_memory=pin)
        self._staged = [None] * STAGING_DEPTH  # events guarding each slot's last upload
        self._next_slot = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixels, self.layout, self.output))

    def stage(self, window: Window, grids: Sequence[tuple[int, int, int]], pixel_values: torch.Tensor,
              pixel_offsets: Sequence[int]) -> list[int]:
        """Copy the window's pixels and layout in; return each item's first output row."""
        budget = window.budget
        slot = self._next_slot
        self._next_slot = (slot + 1) % STAGING_DEPTH
        if self._staged[slot] is not None:
            self._staged[slot].synchronize()  # the slot's previous upload must have left the host
        layout = self._staging[slot].numpy()  # (items, 5) host view, written without allocating
        self._fill_unused(layout, budget)
        token = sequence = row_cursor = 0
        output_rows = []
        run_source = run_target = run_tokens = 0  # items adjacent in the input go up in one copy
        for row, index in enumerate(window.items):
            t, h, w = grids[index]
            tokens = self.model.item_tokens(t, h, w)
            layout[row] = (t, h, w, token, sequence)
            start = pixel_offsets[index]
            if run_tokens and start != run_source + run_tokens:
                self._copy_pixels(pixel_values, run_source, run_target, run_tokens)
                run_tokens = 0
            if not run_tokens:
                run_source, run_target = start, token
            run_tokens += tokens
            output_rows.append(row_cursor)
            row_cursor += self.model.geometry.item_rows(t, h, w)
            token += tokens
            sequence += self.model.item_sequences(t, h, w)
        self._copy_pixels(pixel_values, run_source, run_target, run_tokens)
        self.layout.copy_(self._staging[slot], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._staged[slot] = event
        return output_rows

    def _copy_pixels(self, pixel_values: torch.Tensor, source: int, target: int, tokens: int) -> None:
        rows = pixel_values[source:source + tokens]  # (tokens, C*T*P*P)
        self.pixels[target:target + tokens].copy_(rows, non_blocking=True)

    def stage_dummy(self, budget: int, segments: int = 1) -> int:
        """A valid layout for warm-up and timing: one video of `segments` equal segments (each the
        tower's temporal pool of frames, each frame a row of merge windows) filling as much of
        `budget` as they can. Returns the segment length."""
        merge, pool = self.model.geometry.merge_size, self.model.geometry.temporal_pool
        length = budget // segments // (self.merge * pool) * (self.merge * pool)
        layout = torch.empty_like(self._staging[0])  # (items, 5) host
        self._fill_unused(layout.numpy(), budget)
        layout[0] = torch.tensor((segments * pool, merge, length // pool // merge, 0, 0))
        self.layout.copy_(layout)
        return length

    def _fill_unused(self, layout, budget: int) -> None:
        """Unused rows sit past every token and segment, so no token or segment maps to them."""
        layout[:, 0] = 0
        layout[:, 1:3] = self.model.geometry.merge_size
        layout[:, 3] = budget
        layout[:, 4] = self.sequence_slots

    def forward(self, budget: int, slots: int, segment_lengths: Sequence[int] | None = None) -> None:
        """Encode `budget` staged tokens with `slots` segment slots into the output prefix.

        Graph-safe when segment_lengths is None. Any segment may be as long as the budget.
        """
        meta = self.model.metadata(self.layout, budget, slots, budget, segment_lengths)
        out = self.model(self.pixels[:budget], meta)
        rows = budget // self.merge
        self.output[:rows, 0].copy_(out.embeddings)  # (rows, out_hidden)
        self.output[:rows, 1:].copy_(out.deepstack.transpose(0, 1))  # (rows, deepstack, out_hidden)

    def host_segment_lengths(self, window: Window, grids: Sequence[tuple[int, int, int]], slots: int) -> list[int]:
        """The window's segment lengths, padding segment and empty slots included (eager SDPA)."""
        lengths = []
        for index in window.items:
            lengths += self.model.geometry.item_segments(*grids[index])
        if window.budget > window.tokens:
            lengths.append(window.budget - window.tokens)
        return lengths  # empty slots need no entry: SDPA would run once per empty segment
