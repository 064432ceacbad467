"""Short pauses of Python's garbage collector in the processes vitserve owns.

A full collection walks every object the collector tracks. A worker holds a model, its captured
graphs and torch's state; the engine process its modules and tables: one full pass took 97 ms in
a serving worker on the H200 host and 70 to 90 ms in the engine on a 2-core CPU machine
(gc.callbacks timings), a pause for every request in flight, now and then under load. What exists
once a process is ready lives as long as the process, so it is taken out of the collector's sight
(gc.freeze); later passes walk only what was made since, and still collect it. vLLM freezes the
collector the same way around its graph capture.

Only `vitserve serve` and the worker processes call this: an engine embedded in someone else's
process leaves that process's collector as it is.
"""

from __future__ import annotations

import gc


def freeze_start_up_objects() -> int:
    """Move every object alive now out of the collector's passes (its garbage first: frozen objects
    are never freed). Returns how many are frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
