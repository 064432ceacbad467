"""The engine: worker processes, the scheduler loop and request life cycles (embedded API),
and the ZeroMQ frontend that serves them to clients."""

from __future__ import annotations

import importlib

# Imported when first used: the command line reaches light modules of this package (liveness.py)
# before it imports torch, which the engine needs (launch.py).
_EXPORTS = {"AdmissionError": "admission", "AdmittedItem": "admission", "admit": "admission",
            "EngineConfig": "config", "Engine": "engine", "EngineError": "errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
