"""Worker failure: detect a dead, hung or stuck worker, retry its windows once, restart it in a new epoch.

A worker is lost when its process exits (killed, or a CUDA error, which the worker treats as
fatal), when its socket has no peer, when its heartbeat stops for a few beats (hung, e.g.
stopped: liveness.py), or when a window runs past `window_timeout_s` (the watchdog kills it).
A hung worker is taken out of service at once and sent SIGKILL; the restart reaps it. Items of
its in-flight windows are queued again, once: an item lost a second time fails its request with
`worker_failed`; one whose deadline passes while it waits for the restart fails with
`deadline_exceeded`, as any queued item does (the scheduler's fail_early). The worker is started
again with freshly captured graphs and a new slab pool of the next epoch. The old pool is
retired, not closed: results delivered from it stay readable until released, and its slabs go
with the last one. No reference of the old epoch can name a slab of the new one, so a stale
reference reads the data it was given or fails, never another request's rows.

A mixin of `Engine` (engine.py), which owns the state used here.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from vitserve.ipc.worker_messages import Begin, WorkerReady, WorkerWarm
from vitserve.ipc.slabs import SlabPool, slab_plan
from vitserve.launch import WorkerSpec, worker_endpoint

from .outputs_layout import agreed_capacities, predictor
from .worker_handle import WorkerHandle, WorkerStartError

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # wait before another start attempt, times the attempts so far


class WorkerRestarts:
    def _spawn(self, worker: int, epoch: int, standby: bool = False) -> WorkerHandle:
        """A handle for worker `worker` in `epoch`: the process started early for it (epoch 0 of
        `vitserve serve`), or one to spawn. A standby's socket has a path of its own: one closed
        (its process gone) cannot take a fresh process's path with it."""
        config, device = self.config, self.config.devices[worker]
        endpoint = worker_endpoint(self._socket_dir, worker, epoch) + ("-standby" if standby else "")
        spec = WorkerSpec(worker=worker, endpoint=endpoint, model=config.model,
                          device=device, dtype=config.dtype, threads=config.worker_threads(device),
                          log_level=logging.getLogger().level, heartbeat_s=config.worker_heartbeat_s,
                          progress=config.progress)
        started = self._early.take(spec) if self._early is not None and epoch == 0 else None
        return WorkerHandle(spec, started)

    def _begin(self, worker: int) -> Begin:
        """What the worker gets ready with: the settings, and its cost model if one was measured."""
        config = self.config
        return Begin(msgspec.to_builtins(config.window), msgspec.to_builtins(config.preprocess), config.cache_dir,
                     self._costs.get(worker), busy_poll_ms=config.busy_poll_s * 1e3)

    def _prepare_standby(self, worker: int) -> None:
        """Start the process that will replace `worker` if it is lost (standby_workers): it loads
        the model and waits, for the next epoch. Called once the worker is warm: its loading would
        disturb the worker's graph capture and cost measurement. A standby is only a head start:
        one that cannot be started is logged, and a restart spawns a process as it would without."""
        if not self.config.standby(self.config.devices[worker]) or self._closing or worker in self._standby:
            return
        try:
            handle = self._spawn(worker, self._epochs[worker] + 1, standby=True)
            handle.spawn()
        except Exception:
            log.exception("starting a standby process for worker %d failed", worker)
            return
        watch = asyncio.get_running_loop().create_task(self._watch_standby(worker, handle),
                                                       name=f"vitserve-standby-{worker}")
        self._standby[worker] = (handle, watch)

    async def _watch_standby(self, worker: int, handle: WorkerHandle) -> None:
        """Note when the standby has loaded its model (the stats count those still loading); one that
        cannot load, or exits, is closed (a restart then spawns a fresh process)."""
        try:
            problem = await handle.loaded()
        except Exception as err:  # e.g. an unreadable message: not a standby to count on
            problem = repr(err)
        if not problem:
            self._standby_loaded.add(worker)
            return
        log.error("the standby process of worker %d could not load the model: %s", worker, problem)
        try:
            await handle.close()
        finally:
            if self._standby.get(worker, (None,))[0] is handle:
                del self._standby[worker]

    def _take_standby(self, worker: int) -> WorkerHandle | None:
        """The standby process of `worker` if one waits alive (its epoch is the one after the current
        one, as a restart's first attempt's); one that is gone is closed."""
        waiting = self._standby.pop(worker, None)
        self._standby_loaded.discard(worker)
        if waiting is None:
            return None
        handle, watch = waiting
        watch.cancel()  # start() reads its socket from now on (the watch reads nothing once cancelled)
        if handle.alive():
            return handle
        log.warning("the standby process of worker %d is gone (exit code %s): starting a new one", worker,
                    handle.process.exitcode if handle.process is not None else None)
        self._tasks.append(asyncio.get_running_loop().create_task(handle.close()))
        return None

    def _worker_warm(self, worker: int, warm: WorkerWarm) -> None:
        """The worker captured every graph and has its final cost model: plan with it (and keep it for
        a restart, unless the warm-up stopped early: then it may be the provisional one)."""
        self._warming.discard(worker)
        if not warm.problem:
            self._costs[worker] = warm.cost
        self.scheduler.worker_warm(worker, predictor(warm.cost, self.capacities))
        if warm.problem:
            log.warning("worker %d stopped warming up early (%s): windows without a graph run eagerly",
                        worker, warm.problem)
        else:
            log.info("worker %d is warm %.1f s after it was told to begin", worker, warm.seconds)
        self._prepare_standby(worker)

    def _worker_started(self, ready: WorkerReady) -> None:
        """Note a worker's cost model (final unless it is warming) and whether it warms up."""
        self._worker_proven(ready.worker)  # (its start ran a forward)
        if ready.warming:
            self._warming.add(ready.worker)
        else:
            self._costs[ready.worker] = ready.cost

    async def _new_pool(self, handle: WorkerHandle, epoch: int) -> SlabPool:
        """The pool of the worker's output slabs, which the worker makes (it alone writes them)."""
        # The engine's number in its process keeps the slabs of two embedded engines apart.
        owner, slot_bytes = f"w{handle.worker}n{self._instance}", self.layout.slot_rows * self.layout.row_bytes
        plan = slab_plan(owner, slot_bytes, self.layout.slots, epoch)
        descriptors = await handle.make_slabs(plan, self.config.startup_timeout_s)
        return SlabPool(owner, slot_bytes, self.layout.slots, epoch=epoch, descriptors=descriptors)

    def _check_stuck(self, handle: WorkerHandle, now: float) -> bool:
        """Kill the worker if its oldest window, or its readiness probe, has run past the watchdog;
        True when it was killed. (`now`: the loop's time.)"""
        limit = self.config.window_timeout_s
        in_flight = self.scheduler.workers[handle.worker].in_flight
        probe = self._probe_sent_at(handle.worker)
        if limit is None or not (in_flight or probe is not None):
            return False
        oldest = min((self._windows[window][2] for window in in_flight if window in self._windows), default=now)
        window_s, probe_s = now - oldest, 0.0 if probe is None else time.monotonic() - probe
        if max(window_s, probe_s) <= limit:
            return False
        log.error("worker %d has run a %s for %.1f s, over window_timeout_s=%g: killing it", handle.worker,
                  "window" if window_s >= probe_s else "readiness probe", max(window_s, probe_s), limit)
        handle.kill()
        return True

    def _check_hung(self, handle: WorkerHandle) -> bool:
        """Take a worker whose heartbeat stopped for a few beats out of service and SIGKILL it (a
        stopped process dies too); True when it was hung. Its replies can no longer come: the restart
        closes its socket, and late replies of an old epoch have nowhere to arrive."""
        heartbeat = handle.heartbeat
        if not heartbeat.hung():
            return False
        log.error("worker %d has sent no heartbeat for %.1f s (worker_heartbeat_s=%g): killing it",
                  handle.worker, heartbeat.silent_s(), heartbeat.period_s)
        self._hung.add(handle.worker)
        self._worker_hangs += 1
        handle.kill(wait=False)  # reaped by the restart, off the event loop
        return True

    def _worker_died(self, handle: WorkerHandle) -> None:
        """Retry or fail what the lost worker held, and start it again."""
        worker = handle.worker
        if handle is not self._handles[worker] or not self.scheduler.workers[worker].ready:
            return  # already handled
        code = handle.process.exitcode if handle.process is not None else None
        cause = "not responding" if worker in self._hung else f"exit code {code}"
        log.error("worker %d (%s) is lost (%s)", worker, handle.spec.device, cause)
        problem = f"worker {worker} was lost ({cause}) while running the request's items twice"
        lost = self.scheduler.worker_lost(worker)
        self._warming.discard(worker)
        self._forget_probe(worker)
        self.inputs.worker_gone(worker)
        pool = self._pools.pop(worker)
        self._retired[(worker, pool.epoch)] = pool
        retry, doomed = [], set()
        for dispatch in lost:
            sent = self._windows.pop(dispatch.window, None)
            keys = {item.request.key for item in dispatch.items}
            for _ in keys if sent is not None else ():
                self._release_slot(worker, sent[1])  # the window's reference for each of its requests
            for item in dispatch.items:
                if item.request.key not in self._pending:
                    continue  # cancelled or failed while the window ran
                if item.lost:
                    doomed.add(item.request.key)
                else:
                    retry.append(item)
        self._close_if_unused(worker, pool.epoch)
        self._windows_retried += len(lost)
        self.scheduler.retry([item for item in retry if item.request.key not in doomed])
        for key in doomed:
            self._fail(key, "worker_failed", problem)
        if self.config.worker_restarts and not self._closing:
            self._restarting.add(worker)
            self._tasks.append(asyncio.get_running_loop().create_task(self._restart(handle),
                                                                      name=f"vitserve-restart-{worker}"))
        self._fail_if_no_worker()
        self._poke.set()

    async def _restart(self, old: WorkerHandle) -> None:
        try:
            back = await self._start_again(old)
        except Exception:  # e.g. no room for new slabs: the worker stays down, and nothing may wait for it
            log.exception("restarting worker %d failed", old.worker)
            back = False
        if not back:
            log.error("worker %d stays down", old.worker)
            self._restarting.discard(old.worker)
            self._fail_if_no_worker()

    async def _start_again(self, old: WorkerHandle) -> bool:
        """Start attempts, with a growing pause between them; True once the worker is back."""
        worker = old.worker
        epoch = self._epochs[worker]
        await old.close()
        for attempt in range(1, self.config.worker_restarts + 1):
            epoch += 1  # every attempt gets its own socket and, if it starts, slabs of its own
            handle = (self._take_standby(worker) if attempt == 1 else None) or self._spawn(worker, epoch)
            self._handles[worker] = handle
            try:
                ready = await handle.start(self.config.startup_timeout_s, self._begin(worker))  # the cost model kept
                self._check_restarted(ready)
                pool = await self._new_pool(handle, epoch)
                self.inputs.map_all(worker)
            except WorkerStartError as err:
                log.error("restart %d of %d of worker %d failed: %s", attempt, self.config.worker_restarts, worker, err)
                await handle.close()
                await asyncio.sleep(RESTART_BACKOFF_S * attempt)
                continue
            self._epochs[worker] = epoch
            self._pools[worker] = pool
            self._worker_started(ready)
            loop = asyncio.get_running_loop()
            self.scheduler.worker_back(worker, predictor(ready.cost, self.capacities),
                                       self.layout.slots * self.layout.slot_rows, loop.time())
            self._restarting.discard(worker)
            self._hung.discard(worker)
            self._worker_restarts += 1
            receive = loop.create_task(self._receive_loop(handle), name=f"vitserve-receive-{worker}-e{epoch}")
            receive.add_done_callback(self._loop_ended)
            self._tasks.append(receive)
            log.warning("worker %d is back (epoch %d) %.1f s after it was told to begin%s", worker, epoch,
                        ready.ready_s, "; capturing graphs while it serves" if ready.warming else "")
            self._poke.set()
            if not ready.warming:  # (else once it is warm)
                self._prepare_standby(worker)
            return True
        return False

    def _check_restarted(self, ready: WorkerReady) -> None:
        """A restarted worker must take the same windows and write the same rows, of the same model, as before."""
        try:
            agreed_capacities([self.ready, ready])
        except RuntimeError as err:
            raise WorkerStartError(f"worker {ready.worker} restarted unlike it first started: {err}") from None

    def _fail_if_no_worker(self) -> None:
        """With no worker serving and none coming back, nothing queued can run: fail it."""
        if self.workers_ready() or self._restarting:
            return
        for key in {item.request.key for item in self.scheduler.queue}:
            self._fail(key, "worker_failed", "no worker is left to serve the request")

    def workers_ready(self) -> int:
        return sum(1 for state in self.scheduler.workers.values() if state.ready) if self.scheduler else 0
