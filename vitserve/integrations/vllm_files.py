"""Encoder outputs for vLLM's `ECExampleConnector` (encoder disaggregation over a shared filesystem).

A vLLM instance started as an EC consumer with

    --ec-transfer-config '{"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
                           "ec_connector_extra_config": {"shared_storage_path": "/shared/ec"}}'

skips its vision tower for an item whose file `/shared/ec/<key>/encoder_cache.safetensors` exists and
loads the tensor `ec_cache` from it: `[rows, out_hidden * (1 + deepstack)]` in the model's dtype,
each row's embedding and then its deepstack features. The key is the item's `uuid` in the vLLM
request. `ECFileStore.put(key, item)` writes that file from a vitserve result item:

    store = ECFileStore("/shared/ec", max_bytes=64 << 30, max_age_s=3600)
    with client.encode(images) as result:
        for key, item in zip(keys, result.items):
            store.put(key, item)

vLLM counts a file that exists as a hit, even half written, and never deletes one; so a file is
written under a temporary name and renamed into place, and the store expires old files itself:
past `max_age_s`, and oldest first past `max_bytes` in total, but never one younger than
`min_age_s` (a consumer may have found it and not loaded it yet).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from vitserve.ipc.outputs import EncodedItem

EC_FILE = "encoder_cache.safetensors"
EC_TENSOR = "ec_cache"
MIN_AGE_S = 60.0
EXPIRE_EVERY_S = 1.0  # puts check expiry at most this often (a scan of the folder)
_TEMPORARY = f".{EC_FILE}."  # prefix of files being written (then renamed to EC_FILE)


class _Entry(NamedTuple):
    path: Path
    modified: float
    size: int


class ECFileStore:
    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int | None = None, max_age_s: float | None = None,
                 min_age_s: float = MIN_AGE_S, dtype: torch.dtype | None = None):
        """`root`: the consumers' shared_storage_path. `dtype`: the vLLM model's, when it differs from the
        served dtype (vLLM does not convert what it loads)."""
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive int (or None: no size limit), got {max_bytes!r}")
        for name, value in (("max_age_s", max_age_s), ("min_age_s", min_age_s)):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_age_s, self.min_age_s, self.dtype = max_bytes, max_age_s, min_age_s, dtype
        self._expired_at = 0.0

    def path(self, key: str) -> Path:
        """Where vLLM's connector looks for the item `key` (its uuid in the request)."""
        if not key or key in (".", "..") or "/" in key or "\0" in key or key.startswith(_TEMPORARY):
            raise ValueError(f"key {key!r} cannot name a folder: use the item's uuid (no '/', not '.' or '..')")
        return self.root / key / EC_FILE

    def put(self, key: str, item: EncodedItem | torch.Tensor) -> Path:
        """Write one item's rows (a result item, or a (rows, width) tensor) under `key`, atomically."""
        path = self.path(key)
        rows = item.packed if isinstance(item, EncodedItem) else item  # (rows, out_hidden * (1 + deepstack))
        if rows.dim() != 2:
            raise ValueError(f"an item's rows are 2-D (rows, width), got shape {list(rows.shape)}")
        if self.dtype is not None:
            rows = rows.to(self.dtype)
        temporary = path.with_name(f"{_TEMPORARY}{os.getpid()}.{secrets.token_hex(4)}")
        for attempt in (1, 2):  # (another producer's expiry may remove the key's empty folder meanwhile)
            path.parent.mkdir(exist_ok=True)
            try:
                save_file({EC_TENSOR: rows.contiguous()}, temporary)
                os.replace(temporary, path)  # a reader sees the old file or the new one, never part of one
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
            finally:
                temporary.unlink(missing_ok=True)
        if time.monotonic() - self._expired_at >= EXPIRE_EVERY_S:
            self.expire()
        return path

    def expire(self, now: float | None = None) -> int:
        """Remove what is past max_age_s, then the oldest past max_bytes, never anything younger than
        min_age_s; and, once they are that old, files left half written (by a writer that died) and
        the empty folders a consumer's lookups leave.
        Returns how many items were removed."""
        self._expired_at = time.monotonic()
        now = time.time() if now is None else now
        entries: list[_Entry] = []
        for folder in _folders(self.root):
            files = _files(folder)
            if not files:  # vLLM's connector makes a key's folder when it looks the key up and misses
                stat = _stat(folder)
                if stat is not None and now - stat.st_mtime >= self.min_age_s:
                    _remove_folder(folder)
            for path in files:
                stat = _stat(path)
                if stat is None:
                    continue
                if path.name.startswith(_TEMPORARY):
                    if now - stat.st_mtime >= self.min_age_s:
                        _remove(path)
                elif path.name == EC_FILE:
                    entries.append(_Entry(path, stat.st_mtime, stat.st_size))
        entries.sort(key=lambda entry: entry.modified)  # oldest first
        total, removed = sum(entry.size for entry in entries), 0
        for entry in entries:
            age = now - entry.modified
            if age < self.min_age_s:
                break  # (the rest are younger still)
            too_old = self.max_age_s is not None and age > self.max_age_s
            too_much = self.max_bytes is not None and total > self.max_bytes
            if not (too_old or too_much):
                continue
            if _remove(entry.path):
                total -= entry.size
                removed += 1
        return removed


def _folders(root: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _files(folder: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _stat(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:  # another producer's expiry, meanwhile
        return None


def _remove(path: Path) -> bool:
    """Remove a file and, once empty, its key's folder; False when another process was first."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _remove_folder(path.parent)
    return True


def _remove_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (a write under way), or gone
        pass
