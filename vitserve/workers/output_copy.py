"""Moving a window's output rows to their destination without holding up the next window.

A copy into device memory runs in stream order. A copy to the host goes through a small ring
of device staging buffers: the compute stream copies the rows into a free staging buffer (on
the device, fast) and a copy stream moves them to the host while the next window computes.
"""

from __future__ import annotations

import time

import torch

STAGING_DEPTH = 2


class OutputCopier:
    def __init__(self, like: torch.Tensor):
        self.cuda = like.device.type == "cuda"
        self.staging = [torch.empty_like(like) for _ in range(STAGING_DEPTH)] if self.cuda else []
        self.copy_stream = torch.cuda.Stream(like.device) if self.cuda else None
        self._free: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self._next = 0
        self.host_copy_s = 0.0  # on the CPU (no streams to time): the copies' time so far, for the worker's stages

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.staging)

    def copy(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        """Copy `source` (rows, ...) from the compute stream's current point into `destination`."""
        if not self.cuda:
            began = time.perf_counter()
            destination.copy_(source)
            self.host_copy_s += time.perf_counter() - began
            return
        if destination.device.type == "cuda" or source.shape[0] > self.staging[0].shape[0]:
            destination.copy_(source, non_blocking=True)  # in stream order (an oversize eager window's rows)
            return
        slot = self._next
        self._next = (slot + 1) % len(self.staging)
        compute = torch.cuda.current_stream()
        if self._free[slot] is not None:
            compute.wait_event(self._free[slot])  # the slot's previous host copy has been read out
        staged = self.staging[slot][: source.shape[0]]
        staged.copy_(source)  # (rows, ...) device to device, in stream order
        ready = torch.cuda.Event()
        ready.record(compute)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            destination.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self._free[slot] = done

    def barrier(self) -> torch.cuda.Event | None:
        """An event that completes once all work so far, copies included, has finished."""
        if not self.cuda:
            return None
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event
