"""The engine core: worker processes, the scheduler loop, shared-memory slots and the life of
every request, in the caller's event loop.

    async with Engine(EngineConfig(model="random:qwen3-vl-8b", devices=("cuda:0",))) as engine:
        with await engine.encode([image, video], deadline_ms=200) as result:
            result.items[0].embeddings      # a tensor viewing shared memory

Every accepted request ends exactly once: its future gets the output references, or an
EngineError with a code. A window's slot is held once per request with items in it and is
free again when all of them are released (or failed, or cancelled).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
from typing import Sequence

import msgspec

from vitserve.ipc.messages import ServedModel
from vitserve.ipc.worker_messages import WorkerCost, WorkerReady
from vitserve.ipc.slab_maps import SlabReader
from vitserve.ipc.slabs import SlabPool, Slot
from vitserve.launch import EarlyWorkers
from vitserve.log_limits import LogLimiter
from vitserve.scheduler import Dispatch, Scheduler, WorkerState
from vitserve.workers import Capacities

from .config import EngineConfig
from .inputs import EngineInputs
from .intake import Pending, RequestIntake
from .kept import KeptItem, KeptItems, RunKey
from .busy_poll import BusyPolling
from .latencies import Histograms
from .run_counts import RunCounts
from .outputs_layout import agreed_capacities, item_token_limit, output_layout, predictor
from .probes import ReadinessProbes
from .reports import EngineReports
from .request_ends import RequestEnds
from .restarts import WorkerRestarts
from .windows import WindowTraffic
from .worker_handle import WorkerHandle

log = logging.getLogger(__name__)

_INSTANCES = itertools.count()  # engines made in this process (their slab names differ)


class Engine(RequestIntake, WindowTraffic, WorkerRestarts, RequestEnds, KeptItems, EngineReports, ReadinessProbes):
    def __init__(self, config: EngineConfig | None = None, early: EarlyWorkers | None = None):
        """`early`: worker processes `vitserve serve` started before the engine (launch.py), adopted."""
        self.config = config or EngineConfig()
        self._early = early
        self._instance = next(_INSTANCES)
        self.capacities: Capacities | None = None
        self.ready: WorkerReady | None = None
        self.item_token_limit = self.config.item_token_limit  # until the workers say how wide their rows are (_setup)
        self.latencies = Histograms()  # for /metrics (engine/latencies.py)
        self.run_counts = RunCounts()  # for /metrics: how the workers ran the windows (engine/run_counts.py)
        self.model: ServedModel | None = None  # what it serves, once started (a client's welcome says it too)
        self.scheduler: Scheduler | None = None
        self._handles: list[WorkerHandle] = []
        self._pools: dict[int, SlabPool] = {}  # worker -> the pool of its current epoch
        self._retired: dict[tuple[int, int], SlabPool] = {}  # (worker, epoch) of a lost worker -> its pool
        self._epochs: dict[int, int] = {}  # worker -> its current epoch (slabs and socket)
        self._restarting: set[int] = set()
        self._warming: set[int] = set()  # workers serving while they capture graphs (WorkerWarm ends it)
        self._costs: dict[int, WorkerCost] = {}  # worker -> its latest cost model (a restart reuses it)
        # worker -> (the process waiting to replace it, the task that notes when it has loaded)
        self._standby: dict[int, tuple[WorkerHandle, asyncio.Task]] = {}
        self._standby_loaded: set[int] = set()
        self._hung: set[int] = set()  # workers whose heartbeat stopped, until they are back
        self._proven_at: dict[int, float] = {}  # worker -> time.monotonic() of its latest answered window or probe
        self._probes: dict[int, tuple[int, float]] = {}  # worker -> (its unanswered probe, time.monotonic() sent)
        self._probe_failures: dict[int, str] = {}  # worker -> why its latest probe failed, until it answers
        self._probe_numbers = itertools.count(1)
        self._probes_sent = 0
        self._pending: dict[int, Pending] = {}
        self._windows: dict[int, tuple[Dispatch, Slot, float]] = {}  # window -> (dispatch, slot, loop time sent)
        self._keys = itertools.count(1)
        self._busy_polling = BusyPolling(self.config.busy_poll_s)  # polls while a reply or request is due
        self._windows_sent = 0
        self._items_sent = 0
        self._worker_ms = 0.0  # summed over completed windows: receipt to reply, in the workers
        self._gpu_busy_ms = 0.0  # summed over completed windows: device time they kept busy (CUDA events)
        self._leases_expired = 0
        self._late_results = 0  # results delivered after their request's deadline
        self._worker_restarts = 0
        self._windows_retried = 0
        self._worker_hangs = 0
        self._queued_bytes = 0  # inputs of unfinished requests (max_queued_bytes)
        self._internal_errors = 0  # unexpected failures contained to the requests that met them
        self._kept: dict[str, KeptItem] = {}  # name -> kept item, oldest first (kept.py)
        self._kept_runs: dict[RunKey, int] = {}  # output run -> kept items in it
        self._kept_rows: dict[int, int] = {}  # worker -> rows of the runs its kept items hold
        self._kept_lookups = self._kept_hits = self._kept_expired = self._kept_evicted = 0
        self._log_limits = LogLimiter(log)
        self.failure: BaseException | None = None  # why a loop of the engine ended: it no longer serves
        self.stopped = asyncio.Event()  # set when `failure` is (`vitserve serve` exits non-zero then)
        self._tasks: list[asyncio.Task] = []
        self._poke = asyncio.Event()
        self._reader = SlabReader(self._open_slab)
        self.inputs: EngineInputs | None = None  # the input slabs, made by start()
        self.started = False  # start() has finished: workers ready, pools made, loops running
        self._draining = False  # no new requests; those admitted finish
        self._closing = False
        self._socket_dir: str | None = None

    # -- life cycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        config = self.config
        self.inputs = EngineInputs(self._instance, config.input_slab_size, config.clients.input_arena_bytes,
                                   config.clients.max_input_arenas, self._send_to_worker, self._mapping_workers)
        self._socket_dir = self._early.socket_dir if self._early is not None else tempfile.mkdtemp(prefix="vitserve-")
        self._epochs = dict.fromkeys(range(len(config.devices)), 0)
        try:
            for worker in range(len(config.devices)):
                self._handles.append(self._spawn(worker, 0))
            if self._early is not None:
                self._early.discard_unadopted()
            readies = await asyncio.gather(*(h.start(config.startup_timeout_s, self._begin(h.worker))
                                             for h in self._handles))
            self._setup(readies)
            pools = await asyncio.gather(*(self._new_pool(h, 0) for h in self._handles), return_exceptions=True)
            self._pools.update((w, p) for w, p in enumerate(pools) if isinstance(p, SlabPool))  # closed by close()
            for problem in pools:
                if isinstance(problem, BaseException):
                    raise problem
            for handle in self._handles:
                self.inputs.map_all(handle.worker)
        except BaseException:
            if self._early is not None:
                self._early.discard_unadopted()
            await self.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch_loop(), name="vitserve-dispatch")]
        self._tasks += [loop.create_task(self._receive_loop(h), name=f"vitserve-receive-{h.worker}")
                        for h in self._handles]
        if config.lease_timeout_s is not None:
            self._tasks.append(loop.create_task(self._lease_loop(config.lease_timeout_s), name="vitserve-leases"))
        self._tasks.append(loop.create_task(self._kept_loop(), name="vitserve-kept"))
        if config.readiness_probe_s is not None:
            self._tasks.append(loop.create_task(self._probe_loop(config.readiness_probe_s), name="vitserve-probes"))
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)
        self.started = True
        for handle in self._handles:
            if handle.worker not in self._warming:  # (else once it is warm)
                self._prepare_standby(handle.worker)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop task that fails says why, and every request ends (none may hang)."""
        if task.cancelled() or self._closing or task.exception() is None:
            return  # cancelled at close, or a receive loop whose worker died (handled there)
        log.error("engine task %s ended: %r; failing every request", task.get_name(), task.exception(),
                  exc_info=task.exception())
        self._closing = True
        self.failure = task.exception()
        self.stopped.set()
        for key in list(self._pending):
            self._fail(key, "worker_failed", f"the engine failed internally ({task.exception()!r})")

    def _setup(self, readies: Sequence[WorkerReady]) -> None:
        self.ready = ready = readies[0]
        self.capacities = agreed_capacities(readies)
        config = self.config
        self.item_token_limit = item_token_limit(config, ready, self.capacities)
        if self.item_token_limit < config.item_token_limit:
            log.warning("items are limited to %d patch tokens, not the %d the preprocessing allows: their outputs "
                        "would pass max_item_output_bytes=%d (set max_item_tokens, `vitserve serve --max-item-tokens`, "
                        "for larger ones)", self.item_token_limit, config.item_token_limit, config.max_item_output_bytes)
        self.model = ServedModel(config.model, ready.model_type, ready.fingerprint, ready.dtype, ready.out_hidden,
                                 ready.num_deepstack, self.capacities.budgets, self.item_token_limit,
                                 msgspec.to_builtins(config.preprocess))
        self.layout = output_layout(self.ready, self.capacities, self.config.output_windows, self.item_token_limit)
        states = []
        for ready in readies:
            self._worker_started(ready)
            states.append(WorkerState(ready.worker, predictor(ready.cost, self.capacities),
                                      free_rows=self.layout.slots * self.layout.slot_rows,
                                      row_granularity=self.layout.slot_rows))
        self.scheduler = Scheduler(self.config.scheduler, self.capacities, states)
        if self.config.window_timeout_s is not None:  # half: predictions can be off, the watchdog must not fire
            self.scheduler.max_item_ms = self.config.window_timeout_s * 1e3 / 2

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop admitting (new requests get `shutting_down`) and let every admitted request finish,
        for up to `timeout_s` (default: the config's drain_timeout_s); then fail the rest with
        `shutting_down`. Returns how many failed. Results already delivered stay leased."""
        self._draining = True
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        running = [p.future for p in self._pending.values() if not p.future.done()]
        if running and timeout_s > 0 and not self._closing:
            await asyncio.wait(running, timeout=timeout_s)
        unfinished = [key for key, p in self._pending.items() if not p.future.done()]
        for key in unfinished:
            self._fail(key, "shutting_down", f"the engine shut down before the request finished "
                                             f"(drain_timeout_s={timeout_s:g})")
        if unfinished:
            log.warning("%d requests did not finish within the drain timeout of %g s", len(unfinished), timeout_s)
        return len(unfinished)

    async def close(self) -> None:
        """Drain (see `drain`), stop the workers, remove every slab."""
        if self._tasks:
            await self.drain()
        self._closing = True
        for key in list(self._pending):
            self._fail(key, "shutting_down", "the engine is shutting down")
        self._busy_polling.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        standby = list(self._standby.values())
        self._standby.clear()
        self._standby_loaded.clear()
        for _, watch in standby:
            watch.cancel()
        # Standby processes hold nothing to finish: killed, not asked to stop (one still loading
        # would not read the request for a while).
        await asyncio.gather(*(h.stop() for h in self._handles), *(h.close() for h, _ in standby),
                             *(watch for _, watch in standby), return_exceptions=True)
        for pool in self._all_pools():
            pool.close()
        if self.inputs is not None:
            self.inputs.close()
        self._reader.close()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _send_to_worker(self, worker: int, message) -> bool:
        return self._handles[worker].send_now(message)

    def _mapping_workers(self) -> list[int]:
        """Workers that map input slabs now: started, and not lost (one starting maps them all when ready)."""
        return [h.worker for h in self._handles if h.ready is not None and self.scheduler is not None
                and self.scheduler.workers[h.worker].ready]
