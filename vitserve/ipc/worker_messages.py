"""The messages between the engine and its worker processes, over the worker link
(`ipc/link.py`): windows to run and their results, probes, the start-up steps (slabs, input
mappings, Begin) and shutdown. Internal: clients never see them. The client wire protocol is in
`messages.py`; both follow its conventions (one msgspec Struct per message, tagged unions).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec


class WindowItem(msgspec.Struct, frozen=True):
    """One item of a window: raw pixels (`grid` planned by the engine) or processed patches, as an
    array in an input slab the worker has mapped."""

    kind: Literal["image", "video", "patches"]
    grid: tuple[int, int, int]
    slab: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


class RunWindow(msgspec.Struct, frozen=True, tag="run_window"):
    window: int
    items: list[WindowItem]
    slab: str  # where the window's output rows go: slab and byte offset of the leased run of slots
    offset: int
    run_bytes: int  # the run's length: what the rows leave of it is cleared (no earlier rows show)
    predicted_ms: float = 0.0  # the engine's prediction of its device time (the worker polls for its end near it)


class WindowDone(msgspec.Struct, frozen=True, tag="window_done"):
    window: int
    rows: list[int]  # first output row of each item inside the slot, in the window's order
    worker_ms: float = 0.0  # from the worker's receipt of the window to its reply (diagnostics)
    gpu_ms: float = 0.0  # device time the window kept busy, not overlapping the window before (CUDA events)
    # how the worker ran it, per run of its forward: (budget, 0 unpadded; "graph", "padded" (eager over the
    # graph's buffers) or why it ran eagerly; patch tokens; padding tokens)
    runs: list[tuple[int, str, int, int]] = []
    # stages, device time where the worker has one (CUDA events), else host time: inputs uploaded and
    # preprocessed; the output rows' copy to shared memory after the last forward
    preprocess_ms: float = 0.0
    transfer_ms: float = 0.0


class Probe(msgspec.Struct, frozen=True, tag="probe"):
    """Run a small forward on the device and say so (ProbeDone): the engine's readiness proof for a
    worker that has had no window lately. Queued behind the windows already sent."""

    probe: int


class ProbeDone(msgspec.Struct, frozen=True, tag="probe_done"):
    probe: int
    ms: float  # from the probe's receipt to its forward's end
    problem: str = ""  # why the forward failed (a CUDA error ends the worker instead)


class WindowFailed(msgspec.Struct, frozen=True, tag="window_failed"):
    window: int
    message: str


class WorkerCost(msgspec.Struct, frozen=True):
    """The runner's measured cost model, as plain lists (see workers.cost_model.CostModel)."""

    attention_ms_per_token2: float
    padded_base_ms: list[tuple[int, int, float]]  # (budget, slots, ms)
    eager_base_points: list[tuple[int, float]]  # (tokens, ms)


class WorkerReady(msgspec.Struct, frozen=True, tag="worker_ready"):
    worker: int
    device: str
    budgets: tuple[int, ...]
    max_items: int
    max_sequences: int
    merge_factor: int
    out_hidden: int
    num_deepstack: int
    dtype: str
    model_type: str
    fingerprint: str  # of the vision weights (vitserve.models.fingerprint)
    cost: WorkerCost  # final, or (while warming) what the engine plans with until WorkerWarm
    ready_s: float  # from Begin to this report (the model was loaded before)
    warming: bool = False  # graphs are still being captured (or the cost model measured): WorkerWarm follows
    temporal_pool: int = 1  # grid frames that share one set of output rows (EncoderGeometry.temporal_pool)


class WorkerWarm(msgspec.Struct, frozen=True, tag="worker_warm"):
    """Every graph is captured and the cost model is final: windows run at full speed from now on."""

    worker: int
    cost: WorkerCost
    seconds: float  # from Begin to the end of the warm-up
    problem: str = ""  # why it stopped early (then windows without a graph keep running eagerly)


class WorkerLoaded(msgspec.Struct, frozen=True, tag="worker_loaded"):
    """The process has loaded its model (or failed to: `problem`) and waits for Begin."""

    worker: int
    problem: str = ""


class WorkerStartFailed(msgspec.Struct, frozen=True, tag="worker_start_failed"):
    worker: int
    message: str


class MakeSlabs(msgspec.Struct, frozen=True, tag="make_slabs"):
    """Make the output slabs (name, bytes): the worker alone writes them, so it makes and seals them."""

    slabs: list[tuple[str, int]]


class SlabsMade(msgspec.Struct, frozen=True, tag="slabs_made"):
    descriptors: list[int]  # the worker's read-only descriptors, in order (the engine opens its own)
    problem: str = ""  # why they could not be made (then no descriptors)


class MapInputs(msgspec.Struct, frozen=True, tag="map_inputs"):
    """Map the engine's input slab `slab`, which the engine holds as `descriptor` (opened through /proc)."""

    slab: str
    descriptor: int
    size: int


class DropInputs(msgspec.Struct, frozen=True, tag="drop_inputs"):
    """Unmap an input slab once the windows sent before this message are done; answered by InputsDropped."""

    slab: str


class InputsDropped(msgspec.Struct, frozen=True, tag="inputs_dropped"):
    slab: str


class Begin(msgspec.Struct, frozen=True, tag="begin"):
    """Serve: get ready with these settings and report it. A worker process loads its model first,
    then waits for this message (the engine keeps a standby process waiting, for a fast restart)."""

    window: dict[str, Any]  # the WindowConfig's fields (workers/capacities.py)
    preprocess: dict[str, Any]  # the PreprocessConfig's fields (preprocess/config.py)
    cache_dir: str | None = None  # where measured cost models are kept between starts
    cost: WorkerCost | None = None  # measured by this worker's predecessor: reused, not measured again
    sent_at: float = 0.0  # the engine's time.monotonic() (one clock per host): start-up times count from here
    busy_poll_ms: float = 0.0  # EngineConfig.busy_poll_ms, its default applied


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


ToWorker = Union[RunWindow, Probe, MakeSlabs, MapInputs, DropInputs, Begin, Shutdown]
FromWorker = Union[WorkerLoaded, WorkerReady, WorkerWarm, WorkerStartFailed, SlabsMade, WindowDone, WindowFailed,
                   ProbeDone, InputsDropped]
