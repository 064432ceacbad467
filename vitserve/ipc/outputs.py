"""Results as tensors: each item's rows viewed in place, in a slab or in an inline frame.

A result holds its slots until `release()`, the end of its `with` block, or garbage
collection, whichever comes first; its tensors must not be used after that (the slot may
hold another window's rows by then). With an output device the rows are copied there and
the slots are released at once.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Callable, Sequence

import numpy as np
import torch

from .messages import OutputRef
from .slab_maps import SlabReader
from .slabs import numpy_dtype


class EncodedItem:
    """One item's outputs, viewing its rows where they lie (shared memory, or the reply's frame).
    The views are made on first use: a consumer that reads one of them pays for that one only."""

    def __init__(self, rows: torch.Tensor, kind: str, grid: tuple[int, int, int]):
        self.rows = rows  # (rows, 1 + num_deepstack, out_hidden): row r's embedding, then its deepstack features
        self.kind = kind  # "image", "video" or "patches" (sent already processed)
        # (t, h, w) in patches, as the processor's grid_thw; rows = t * h * w / merge² (Kimi K2.5: per
        # chunk of 4 frames, t rounded up to whole chunks)
        self.grid = grid

    @functools.cached_property
    def embeddings(self) -> torch.Tensor:
        return self.rows[:, 0]  # (rows, out_hidden): what the language model consumes

    @functools.cached_property
    def deepstack(self) -> torch.Tensor:
        return self.rows[:, 1:].transpose(0, 1)  # (num_deepstack, rows, out_hidden)

    @functools.cached_property
    def packed(self) -> torch.Tensor:
        # (rows, (1 + num_deepstack) * out_hidden): each row's embedding then its deepstack features,
        # the layout vLLM's encoder cache holds for Qwen3-VL; the same memory as the two above
        return self.rows.reshape(self.rows.shape[0], -1)

    def __repr__(self) -> str:
        return f"EncodedItem(kind={self.kind!r}, grid={self.grid}, rows={tuple(self.rows.shape)}, {self.rows.dtype})"


class Encoded:
    """The outputs of one request, in its items' order (of a lookup: None for a name not kept)."""

    def __init__(self, items: list[EncodedItem | None], release: Callable[[], None] | None,
                 refs: Sequence[OutputRef | None] = ()):
        self.items = items
        # Where each item's rows lie: another process on this host reads them with `client.view(ref)`
        # while this result is held (inline rows have no such place).
        self.refs = list(refs)
        self._finalizer = weakref.finalize(self, release) if release is not None else None

    def release(self) -> None:
        """Give the shared-memory slots back (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def released(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def __enter__(self) -> Encoded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> EncodedItem:
        return self.items[index]


def ref_array(ref: OutputRef, reader: SlabReader, frames: Sequence[memoryview] = ()) -> np.ndarray:
    """(rows, 1 + deepstack, out_hidden) numpy view of one item's output, read-only."""
    if ref.frame >= 0:
        return np.frombuffer(frames[ref.frame], dtype=numpy_dtype(ref.dtype)).reshape(ref.shape)
    return reader.array(ref.slab, ref.epoch, ref.offset, ref.shape, ref.dtype)


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy of a read-only view. Torch warns about those once per process; the views
    are read-only on purpose, so that one warning is silenced (a warnings context per call would
    cost more than the conversion)."""
    global _warned
    if _warned:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    _warned = True
    return tensor


_warned = False


def encoded_from_refs(refs: Sequence[OutputRef | None], reader: SlabReader, release: Callable[[], None] | None,
                      output_device: str | None = None, frames: Sequence[memoryview] = ()) -> Encoded:
    """The items of these references (None stays None: a lookup's name that nothing is kept under)."""
    items = []
    for ref in refs:
        if ref is None:
            items.append(None)
            continue
        rows = read_only_tensor(ref_array(ref, reader, frames))  # (rows, 1 + deepstack, out_hidden)
        if ref.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)  # stored as uint16 (numpy has no bfloat16)
        if output_device is not None:
            rows = rows.to(output_device, copy=True)
        items.append(EncodedItem(rows, ref.kind, tuple(ref.grid)))
    if output_device is not None and release is not None:
        release()
        release = None
    return Encoded(items, release, refs)
