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


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    """A direct link's heartbeat (ipc/direct.py), answered with a Pong even before hello: a client
    that hears nothing for three beats takes the engine for stopped (ZeroMQ's links beat in ZMTP)."""


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


class Pong(msgspec.Struct, frozen=True, tag="pong"):
    pass


ClientMessage = Union[Hello, Encode, Lookup, Forget, Cancel, Release, StatsQuery, HealthQuery, Ping]
ServerMessage = Union[Welcome, Result, Found, Error, Stats, Health, Pong]


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

