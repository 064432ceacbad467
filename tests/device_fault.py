"""A worker entry point that breaks its CUDA context once: the first worker started with a given
marker file launches an out-of-bounds gather (a device-side assert, reported asynchronously)
before its first window's work; workers started after it run clean."""

from __future__ import annotations

import os

import torch

from vitserve.workers import process


def faulting_worker_main(marker: str, spec: process.WorkerSpec) -> None:
    if not os.path.exists(marker):
        open(marker, "x").close()
        clean_encode = process.Worker._encode

        def fault_then_encode(self, *args, **kwargs):  # (whatever _encode takes: it is passed on)
            index = torch.tensor([1 << 20], device=self.device)
            torch.zeros(1, device=self.device)[index]  # out of bounds: the context is broken from here on
            return clean_encode(self, *args, **kwargs)

        process.Worker._encode = fault_then_encode
    process.worker_main(spec)
