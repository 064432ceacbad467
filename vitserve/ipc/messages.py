"""The wire protocol: every message is one msgspec Struct of a tagged union, sent as a
msgpack header frame followed by zero or more raw array frames.

Arrays never go through msgpack: an `ArrayRef` in the header names the extra frame that
holds the bytes, with dtype and shape, so ZeroMQ sends and receives them without a copy.
Results usually carry no bytes at all: an `OutputRef` points into a worker's shared-memory
slab (slab name, epoch, offset). Clients on another host ask for `inline` outputs and get
the rows as frames instead. No pickle anywhere: a decoder only ever builds these types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

# 2: release carries a list of ids. 3: inline results are released too (acknowledging their bytes);
# element counts are bounded. 4: slabs are sealed memory files, their descriptors passed over the
# slab channel (not files opened by name); hello names no process (results belong to the connection).
# 5: inputs may lie in the client's input arena (ArrayRef.offset), which the welcome offers.
# 6: each output names its item's kind and patch grid. 7: the welcome describes the served model
# (its type, weights' fingerprint and preprocessing). 8: items may be kept under names, looked up and forgotten.
PROTOCOL_VERSION = 8
# Element counts are checked while decoding, before anything is built: a header of millions of
# items or ids is refused at the cost of reading its length.
MAX_ITEMS_PER_REQUEST = 4096
MAX_RELEASE_IDS = 4096
MAX_NAME_LENGTH = 256
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]

# What a request can end with, besides a result (DESIGN.md, failure model). `protocol` is for
# messages that cannot be understood at all (undecodable, wrong version, bad frames).
ErrorCode = Literal[
    "invalid_input", "too_large", "overloaded", "deadline_exceeded", "cancelled", "worker_failed",
    "shutting_down", "protocol",
]


class ArrayRef(msgspec.Struct, frozen=True):
    frame: int  # index among the frames after the header; -1 when the array is in the input arena
    dtype: str  # numpy dtype name: uint8, float32, float16, or bfloat16
    shape: Annotated[tuple[int, ...], msgspec.Meta(max_length=8)]
    offset: int = -1  # bytes into the sender's input arena (ipc/input_slabs.py), when it is there


class ImageItem(msgspec.Struct, frozen=True, tag="image"):
    pixels: ArrayRef  # uint8 (H, W, 3)


class VideoItem(msgspec.Struct, frozen=True, tag="video"):
    frames: ArrayRef  # uint8 (T, H, W, 3)


class PatchItem(msgspec.Struct, frozen=True, tag="patches"):
    """Already-processed input, as the Hugging Face processor returns it for one item."""

    pixel_values: ArrayRef  # float32 (t * h * w, C * T * P * P)
    grid_thw: tuple[int, int, int]


Item = Union[ImageItem, VideoItem, PatchItem]


class OutputRef(msgspec.Struct, frozen=True):
    """One item's output rows: (rows, 1 + deepstack, out_hidden), row r = embedding then deepstack;
    and what the item was: its kind and its patch grid (t, h, w), as a decoder lays out its
    placeholders (rows = t * h * w / merge²)."""

    shape: tuple[int, int, int]
    dtype: str
    kind: Literal["image", "video", "patches"]
    grid: tuple[int, int, int]
    slab: str = ""  # shared-memory slab file name; empty when the bytes came inline
    epoch: int = 0
    offset: int = 0  # bytes into the slab
    frame: int = -1  # index of the inline frame; -1 when in shared memory


# -- client to server -------------------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    version: int
    client: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)] = ""


class Encode(msgspec.Struct, frozen=True, tag="encode"):
    id: int  # chosen by the client, in use until its reply went out and, for a result, it is released
    items: Annotated[list[Item], msgspec.Meta(max_length=MAX_ITEMS_PER_REQUEST)]
    deadline_ms: float | None = None  # relative to arrival at the engine
    priority: int = 0  # lower values are served first (as in Triton and vLLM)
    inline: bool = False  # outputs as frames instead of shared-memory references
    # A name per item ('' for none): once the request ends with a result, each named item is kept
    # for `keep_s` seconds (None: the engine's kept_timeout_s) or until forgotten; Lookup finds it.
    keep: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS_PER_REQUEST)] | None = None
    keep_s: float | None = None


class Lookup(msgspec.Struct, frozen=True, tag="lookup"):
    """The kept items of these names, answered with Found; held like a result until released by `id`."""

    id: int
    names: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS_PER_REQUEST)]
    inline: bool = False


class Forget(msgspec.Struct, frozen=True, tag="forget"):
    """Keep these names no longer (unknown names are skipped; no reply)."""

    names: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS_PER_REQUEST)]


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    id: int


class Release(msgspec.Struct, frozen=True, tag="release"):
    """The client is done reading these requests' outputs; their slots may be reused, and inline
    outputs' bytes count no more against the client. A request still running is cancelled: it ends
    with a `cancelled` error, and its id stays in use until then. (Clients gather the releases of
    one event-loop turn into one message.)"""

    ids: Annotated[list[int], msgspec.Meta(max_length=MAX_RELEASE_IDS)]


class StatsQuery(msgspec.Struct, frozen=True, tag="stats"):
    pass


class HealthQuery(msgspec.Struct, frozen=True, tag="health"):
    pass


# -- server to client -------------------------------------------------------------------------


class ServedModel(msgspec.Struct, frozen=True):
    """The model behind an engine: whether it is the tower a decoder was trained with, and what a
    caller needs to build the decoder's prompt without preprocessing again."""

    source: str  # the engine's --model: a checkpoint directory or a random: preset
    model_type: str  # Hugging Face's model_type of the checkpoint, e.g. "qwen3_vl"
    fingerprint: str  # of the vision weights as stored (vitserve.models.fingerprint)
    dtype: str  # of the output rows, e.g. "bfloat16"
    out_hidden: int
    num_deepstack: int
    budgets: tuple[int, ...]  # the windows' token budgets
    item_token_limit: int  # the most patch tokens one item may have
    preprocess: dict[str, Any]  # the PreprocessConfig in force (vitserve.preprocess), as its fields


class Welcome(msgspec.Struct, frozen=True, tag="welcome"):
    version: int
    model: ServedModel
    input_token: str = ""  # claims this connection's input arena over the slab channel; empty: none offered


class Result(msgspec.Struct, frozen=True, tag="result"):
    id: int
    outputs: list[OutputRef]  # one per item, in the request's order


class Found(msgspec.Struct, frozen=True, tag="found"):
    id: int
    outputs: list[OutputRef | None]  # one per name of the Lookup, None where nothing is kept under it


class Error(msgspec.Struct, frozen=True, tag="error"):
    id: int | None  # None when the failing message had no readable request id
    code: ErrorCode
    message: str
    retry_after_ms: float | None = None  # with `overloaded`: when trying again is likely to work


class Stats(msgspec.Struct, frozen=True, tag="stats_reply"):
    values: dict[str, float]


class Health(msgspec.Struct, frozen=True, tag="health_reply"):
    ready: bool  # admitting requests, with at least one worker up
    workers_ready: int
    workers: int
    detail: str = ""
    worker_pids: list[int] = []  # running workers (fault-injection tools on the same host use them)
    pid: int = 0  # the engine's process
    pids_by_worker: dict[int, int] = {}  # worker number -> its running process (worker_pids is not by number)


ClientMessage = Union[Hello, Encode, Lookup, Forget, Cancel, Release, StatsQuery, HealthQuery]
ServerMessage = Union[Welcome, Result, Found, Error, Stats, Health]


# -- the slab channel (a Unix socket beside an ipc:// endpoint; descriptors ride as SCM_RIGHTS) -------


class SlabAsk(msgspec.Struct, frozen=True, tag="slab_ask"):
    slab: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]  # the slab field of an OutputRef


class ArenaAsk(msgspec.Struct, frozen=True, tag="arena_ask"):
    """A local client asks for its connection's input arena, naming the token of its welcome."""

    token: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]


class SlabGrant(msgspec.Struct, frozen=True, tag="slab_grant"):
    slab: str  # the slab asked for; for an arena, the arena's name
    error: str = ""  # empty: a descriptor of the slab comes with this message (read-only for output slabs)


SlabMessage = Union[SlabAsk, ArenaAsk, SlabGrant]


# -- engine and worker processes ----------------------------------------------------------------


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
