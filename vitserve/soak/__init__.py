"""`vitserve soak`: long mixed load with injected faults against a live engine, checking that every
request ends exactly once, that results repeat, and that nothing leaks."""

from .run import Soak, SoakConfig, soak

__all__ = ["Soak", "SoakConfig", "soak"]
