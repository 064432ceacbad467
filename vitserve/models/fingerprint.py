"""The fingerprint of a tower's weights: which weights a server serves, in 32 hex digits.

It is a SHA-256 over one line per tensor, in name order: the name (as in the tower's state dict,
with no `model.visual.` prefix), the dtype and shape the weights have where they come from (the
checkpoint's stored tensors; for a `random:` preset, the float32 values it draws) and the SHA-256
of their bytes. A decoder's own vision tower in the checkpoint's dtype gives the same fingerprint
(`weights_fingerprint(model.visual.state_dict().items())`); in another dtype, compare outputs instead.
Each tensor's digest stands alone, so tensors can be hashed in any order and in parallel threads
(hashlib lets go of the GIL for large buffers).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, NamedTuple

import torch

FINGERPRINT_HEX_DIGITS = 32


class TensorDigest(NamedTuple):
    dtype: str  # "bfloat16", "float32", ...
    shape: tuple[int, ...]
    sha256: str


def tensor_digest(tensor: torch.Tensor) -> TensorDigest:
    flat = tensor.detach().reshape(-1).contiguous().cpu()  # (elements,)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""  # raw little-endian bytes, no copy
    return TensorDigest(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), hashlib.sha256(data).hexdigest())


def combine(digests: Mapping[str, TensorDigest]) -> str:
    lines = "".join(f"{name}\t{d.dtype}\t{','.join(map(str, d.shape))}\t{d.sha256}\n"
                    for name, d in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:FINGERPRINT_HEX_DIGITS]


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The fingerprint of these (name, tensor) pairs, e.g. a vision tower's `state_dict().items()`."""
    return combine({name: tensor_digest(tensor) for name, tensor in named_tensors})
