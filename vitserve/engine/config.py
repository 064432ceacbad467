"""EngineConfig: what a user sets to run the engine, checked when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from vitserve.checks import check_int, check_seconds
from vitserve.preprocess import PreprocessConfig
from vitserve.preprocess.geometry import largest_item_tokens
from vitserve.preprocess.in_force import preprocess_for
from vitserve.scheduler import SchedulerConfig
from vitserve.workers import WindowConfig
from vitserve.workers.cost_cache import default_cache_dir

from .limits import ClientLimits

from vitserve.choices import DEFAULT_MODEL
DEFAULT_INPUT_SLAB_BYTES = 1 << 30
DEFAULT_ITEM_OUTPUT_BYTES = 1 << 30
MIN_HEARTBEAT_S = 0.05  # faster beats would only keep the worker's beat thread and the engine busy
DEFAULT_GPU_BUSY_POLL_S = 0.002  # busy_poll_ms's default with GPU workers (engine/busy_poll.py)
BUSY_POLL_MIN_CORES = 8  # with fewer, a polling engine and worker would slow the clients on the same cores
MAX_BUSY_POLL_MS = 1000  # polling longer only burns a core: a message this late may as well wake a sleeper
MIN_READINESS_PROBE_S = 0.1  # faster probes would only take the device from windows


@dataclass(frozen=True)
class EngineConfig:
    """model: checkpoint directory or preset. devices: one worker process per entry ("cuda:0",
    "cpu"). preprocess: None reads the checkpoint's preprocessor_config.json and
    video_preprocessor_config.json (the released values of the model's family for a preset or a directory
    without them). output_windows: each worker's shared-memory output, in windows of the largest
    budget; a window leases the rows it needs until every request with items in it is released.
    max_item_tokens: the largest single item admitted (items over the largest budget run
    eagerly); larger ones get `too_large`. By default, the most the preprocessing's pixel limits
    give one item (anything the model's own processor accepts is accepted), and at least twice
    the largest budget, but no more than `max_item_output_bytes` of outputs (each worker's shared
    memory holds the largest item: Kimi K2.5's processor bounds frames, not clips, so its largest
    clip would take gigabytes); a max_item_tokens given is taken as it is. max_request_bytes: the
    input arrays of one request together (over the wire, a larger frame disconnects its sender
    before it is read).
    input_slab_bytes: the shared memory that inputs received as frames (tcp:// clients, the
    embedded API) are copied into for the workers, page-locked on GPUs; full: `overloaded`.
    lease_timeout_s: results not released this long after they were delivered are reclaimed
    (their rows may then be overwritten); None keeps them until released. worker_restarts: start
    attempts for a worker that died before it is given up (0: never restart). window_timeout_s: a
    window running longer is taken for a stuck worker, which is killed and restarted (None: no
    watchdog). worker_heartbeat_s: how often each worker proves it is alive; one silent for three
    beats is hung (e.g. stopped): it takes no more windows, its windows are retried or failed, and
    it is killed and restarted. readiness_probe_s: a worker that has answered no window for this long
    runs a small forward on its device (a probe) to show that it still serves; None: no probes (a
    worker is then ready while its process beats). readiness_timeout_s: a probe unanswered this long, or
    a window unanswered this long past the predicted end of all its worker was sent, makes the worker
    unready until it answers. drain_timeout_s: how long close() lets queued and running requests
    finish before it fails the rest with `shutting_down`. standby_workers: keep a started process
    per worker waiting with the model loaded, which replaces the worker at once if it is lost
    (instead of seconds of imports and loading). None: on for GPU workers (it holds a device
    context and a copy of the weights), off for CPU ones. busy_poll_ms: how long the engine and its
    workers poll for an expected message instead of sleeping (a sleeping process's wake-up costs
    tens to hundreds of microseconds): the engine from a quarter of it before a window's reply is
    due until that long after, a worker for that long after each reply (the next window of a
    sequential client) and from a quarter of it before its window's predicted end; 0: never.
    None: 2 ms when every worker is on a GPU and the process may use 8 cores or more, else 0 (CPU
    workers need the host's cores, and so do clients on a small host)."""

    model: str = DEFAULT_MODEL
    devices: tuple[str, ...] = ("cpu",)
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on the CPU
    window: WindowConfig = field(default_factory=WindowConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    preprocess: PreprocessConfig | None = None  # None: the checkpoint's processor configs, else the released values
    clients: ClientLimits = field(default_factory=ClientLimits)  # what one client of `serve` may use (limits.py)
    output_windows: int = 16
    max_item_tokens: int | None = None  # default: the preprocessing's largest item, at least twice the largest budget
    max_item_output_bytes: int = DEFAULT_ITEM_OUTPUT_BYTES  # what the default max_item_tokens may give one item's outputs
    startup_timeout_s: float = 600.0
    cpu_threads_per_worker: int | None = None  # default: the host's cores less two, shared by the CPU workers
    output_device: str | None = None  # embedded engine: copy results to this torch device
    max_request_bytes: int = 1 << 30
    kept_timeout_s: float = 300.0  # the longest an item stays kept under its name (engine/kept.py)
    kept_share: float = 0.5  # of each worker's output rows that kept items may hold; past it the oldest go
    max_queued_bytes: int = 4 << 30  # input bytes of every unfinished request together; past it: overloaded
    input_slab_bytes: int | None = None  # the engine's input slab for inputs received as frames (default below)
    lease_timeout_s: float | None = 300.0
    worker_restarts: int = 3
    window_timeout_s: float | None = 60.0
    worker_heartbeat_s: float = 1.0
    readiness_probe_s: float | None = 5.0
    readiness_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    standby_workers: bool | None = None
    busy_poll_ms: float | None = None  # default: 2 with GPU workers only, on 8 cores or more; else 0
    progress: bool = False  # workers say their start-up phases on stderr (`vitserve serve` turns it on)
    # Where measured cost models are kept between starts (workers/cost_cache.py); None: measure at every start
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))

    def __post_init__(self) -> None:
        if self.preprocess is None:  # (a few small JSON files: read now, so that a bad one is refused at once)
            object.__setattr__(self, "preprocess", preprocess_for(self.model))
        devices = (self.devices,) if isinstance(self.devices, str) else tuple(self.devices)
        object.__setattr__(self, "devices", devices)
        if not devices:
            raise ValueError("devices is empty: name at least one, e.g. ('cuda:0',) or ('cpu',)")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16 (or None for the default)")
        check_int("output_windows", self.output_windows, 2, "one window fills while clients read another")
        if self.max_item_tokens is not None:
            check_int("max_item_tokens", self.max_item_tokens, 1, "or None for the largest item the preprocessing gives")
        check_int("max_item_output_bytes", self.max_item_output_bytes, 1, "the outputs of the largest item by default")
        if self.cpu_threads_per_worker is not None:
            check_int("cpu_threads_per_worker", self.cpu_threads_per_worker, 1, "or None to share the host's cores")
        check_int("max_request_bytes", self.max_request_bytes, 1, "the input arrays of one request together")
        check_seconds("kept_timeout_s", self.kept_timeout_s, "the longest an item stays kept under its name")
        if isinstance(self.kept_share, bool) or not isinstance(self.kept_share, (int, float)) or not 0 < self.kept_share <= 1:
            raise ValueError(f"kept_share must be a fraction in (0, 1], got {self.kept_share!r}: of each worker's output "
                             "rows that kept items may hold")
        check_int("max_queued_bytes", self.max_queued_bytes, self.max_request_bytes,
                  "at least max_request_bytes: the input bytes of every unfinished request together")
        if self.input_slab_bytes is not None:
            check_int("input_slab_bytes", self.input_slab_bytes, self.max_request_bytes,
                      "at least max_request_bytes (or None for that): inputs received as frames are copied into it")
        check_seconds("lease_timeout_s", self.lease_timeout_s, "or None: leases never expire", none_ok=True)
        check_int("worker_restarts", self.worker_restarts, 0, "0: a worker that dies stays down")
        check_seconds("window_timeout_s", self.window_timeout_s, "or None: no watchdog", none_ok=True)
        check_seconds("worker_heartbeat_s", self.worker_heartbeat_s, "a worker silent for three beats is restarted")
        if self.worker_heartbeat_s < MIN_HEARTBEAT_S:
            raise ValueError(f"worker_heartbeat_s must be at least {MIN_HEARTBEAT_S} s (faster beats only cost CPU), "
                             f"got {self.worker_heartbeat_s!r}")
        check_seconds("readiness_probe_s", self.readiness_probe_s, "or None: no probes", none_ok=True)
        if self.readiness_probe_s is not None and self.readiness_probe_s < MIN_READINESS_PROBE_S:
            raise ValueError(f"readiness_probe_s must be at least {MIN_READINESS_PROBE_S} s (faster probes only take "
                             f"the device from windows), or None for no probes; got {self.readiness_probe_s!r}")
        if self.busy_poll_ms is not None and (
                isinstance(self.busy_poll_ms, bool) or not isinstance(self.busy_poll_ms, (int, float))
                or not 0 <= self.busy_poll_ms <= MAX_BUSY_POLL_MS):
            raise ValueError(f"busy_poll_ms must be a number of milliseconds from 0 (never poll: sleep until a "
                             f"message comes) to {MAX_BUSY_POLL_MS}, or None for the devices' default; "
                             f"got {self.busy_poll_ms!r}")
        check_seconds("readiness_timeout_s", self.readiness_timeout_s, "a probe unanswered this long makes its "
                      "worker unready")
        check_seconds("drain_timeout_s", self.drain_timeout_s, "0: fail what is pending at once", zero_ok=True)
        check_seconds("startup_timeout_s", self.startup_timeout_s, "how long a worker may take to load the model")

    def worker_threads(self, device: str) -> int | None:
        """Torch threads of the worker on `device`: None (torch's default) for accelerators. CPU
        workers leave two cores to the engine's event loop and local clients: oversubscribed
        cores make every thread spin and the whole host slow."""
        if not device.startswith("cpu"):
            return None
        if self.cpu_threads_per_worker is not None:
            return self.cpu_threads_per_worker
        cpu_workers = sum(1 for d in self.devices if d.startswith("cpu"))
        return max(1, (len(os.sched_getaffinity(0)) - 2) // cpu_workers)

    @property
    def busy_poll_s(self) -> float:
        """busy_poll_ms in seconds, its default applied."""
        if self.busy_poll_ms is not None:
            return self.busy_poll_ms / 1e3
        if any(d.startswith("cpu") for d in self.devices) or len(os.sched_getaffinity(0)) < BUSY_POLL_MIN_CORES:
            return 0.0
        return DEFAULT_GPU_BUSY_POLL_S

    def standby(self, device: str) -> bool:
        """Whether the worker on `device` has a standby process (standby_workers; None: GPUs only)."""
        return self.standby_workers if self.standby_workers is not None else not device.startswith("cpu")

    @property
    def input_slab_size(self) -> int:
        """input_slab_bytes, by default 1 GiB within max_request_bytes..max_queued_bytes (page-locked on GPUs:
        the queue's whole bound would be too much memory to pin)."""
        return self.input_slab_bytes or min(self.max_queued_bytes, max(self.max_request_bytes, DEFAULT_INPUT_SLAB_BYTES))

    @property
    def largest_budget(self) -> int:
        return self.window.budgets[-1] if self.window.budgets else self.window.max_budget

    @cached_property  # (admission reads it for every item)
    def item_token_limit(self) -> int:
        return self.max_item_tokens or max(2 * self.largest_budget, largest_item_tokens(self.preprocess))
