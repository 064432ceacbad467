"""`vitserve soak`: long mixed load with injected faults against a live engine, checking that every
request ends exactly once, that results repeat, and that nothing leaks."""

__all__ = ["Soak", "SoakConfig", "soak"]


def __getattr__(name: str):
    # Imported on first use: run.py brings the client and torch, and `vitserve serve` builds every
    # command's parser (soak's too) before it starts its GPU workers, which must not wait for torch.
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
