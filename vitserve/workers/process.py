"""The worker process: one per device. Its Worker (worker.py) loads the model, captures the
budget graphs and reports its capacities and cost model; this loop then runs the windows the
engine sends.

Each window arrives as one message naming where its items lie in the engine's input slabs
(which the worker maps and page-locks once: worker_inputs.py) and the shared-memory slot its
output rows go to. The items go to the device in one asynchronous copy per run of adjacent
items, raw images and videos are preprocessed there, and the runner's single output copy lands
in the slot, which the engine's clients read in place. The process talks to the engine over one
Unix socket (ipc/link.py), and a thread of its own writes heartbeats into shared memory, which the
engine watches for a hung worker (engine/liveness.py).
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import msgspec
import torch

from vitserve.gc_pauses import freeze_start_up_objects
from vitserve.ipc.codec import Codec
from vitserve.log_lines import configure_logging
from vitserve.ipc.link import LinkError
from vitserve.ipc.worker_link import WorkerLink
from vitserve.ipc.worker_messages import (
    Begin, DropInputs, InputsDropped, MakeSlabs, MapInputs, Probe, RunWindow, Shutdown, ToWorker, WorkerLoaded,
    WorkerStartFailed,
)

from vitserve.launch import WorkerSpec

from .placement import keep_to_device_node
from .running import DeviceFault, Pauses, Probing, Running
from .worker import Worker, load_for_worker, start_progress

__all__ = ["EXIT_DEVICE_FAULT", "Worker", "WorkerSpec", "worker_main"]

log = logging.getLogger(__name__)

# Windows queued on the device ahead of their replies: the host prepares the next window while
# the GPU runs the current one. (The engine keeps a matching number in flight per worker.)
MAX_RUNNING = 2
# While windows run on the device, the loop sleeps this long between checks for a new window and
# for the oldest one's completion (poll() waits in whole milliseconds). Blocking on the oldest
# instead would leave a window that arrives meanwhile unprepared until the device is idle: a
# bubble of host work in every window. Spinning all the time instead (no sleep; and 2 ms of
# spinning before an idle worker blocks) cost 10 to 20 % of the served throughput on the H200 (GPU
# busy 94 % instead of 98 to 99 %): the spinning thread slows the engine's and the client's on the
# shared cores. So the loop polls without sleeping only near the oldest window's predicted end and
# for Begin.busy_poll_ms after its last reply (`Pauses`): a sleep overruns by about 50 µs on the H200
# host, and a wake-up from a blocking poll costs 50 to 180 µs there.
RUNNING_POLL_S = 100e-6
# Linux lets a sleep overrun by the thread's timer slack (50 µs by default), which would add half
# again to each poll; the worker's main thread asks for 1 µs (prctl PR_SET_TIMERSLACK).
PR_SET_TIMERSLACK, TIMER_SLACK_NS = 29, 1000
# While warming up (workers/worker.py), a step runs when the worker is idle, when its in-flight
# queue is full, and at the latest after this many windows, so a steady stream of windows that
# never leaves it idle or full still lets the warm-up end.
WARM_STEP_EVERY = 4
ORPHAN_CHECK_MS = 1000  # an idle worker checks this often that the engine that started it still runs
EXIT_DEVICE_FAULT = 3  # exit code after a CUDA error: the context is unusable, the engine restarts us
EXIT_ENGINE_GONE = 4  # exit code when the engine's end of the link closed without a Shutdown



def worker_main(spec: WorkerSpec) -> None:
    """Entry point of the spawned process: load the model, then wait for the engine's Begin (at
    once at a start; later for a standby process), get ready and serve windows."""
    engine_pid = os.getppid()
    configure_logging(spec.log_level, prefix=f"worker {spec.worker}: ")
    keep_to_device_node(spec.device)  # before its threads and pages: they inherit the device's node
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack on stderr
    start_heartbeat(spec.beat_at, spec.heartbeat_s)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    link = WorkerLink(spec.endpoint, engine_pid)  # (connects at the first send: the engine may not listen yet)
    try:
        serve_engine(spec, link, engine_pid)
    except LinkError as err:  # the engine is gone (or closed the link): nothing left to serve
        log.error("%s: exiting", err)
        # At once: an orphan must not hold its device's memory for the seconds an interpreter with
        # torch takes to shut down (the kernel frees what the process holds).
        os._exit(EXIT_ENGINE_GONE)
    link.close()


def serve_engine(spec: WorkerSpec, link: WorkerLink, engine_pid: int) -> None:
    encoder = msgspec.msgpack.Encoder()
    model, problem = None, None
    try:
        model = load_with_progress(spec)
    except Exception as err:  # said again once the engine asks (it raises it at start-up)
        log.exception("loading the model failed")
        problem = f"{type(err).__name__}: {err}"
    link.send(encoder.encode(WorkerLoaded(spec.worker, problem or "")))
    worker = None
    begin = wait_to_begin(link, engine_pid)
    try:
        if begin is not None and problem is None:
            worker = Worker(spec, engine_pid, begin, model)
            freeze_start_up_objects()  # (before the first window: the full pass it takes is a pause)
            link.send(encoder.encode(worker.ready))
    except Exception as err:
        log.exception("start-up failed")
        problem = f"{type(err).__name__}: {err}"
    if begin is not None and worker is None:
        link.send(encoder.encode(WorkerStartFailed(spec.worker, problem)))
    if worker is not None:
        try:
            serve_windows(worker, link, encoder, engine_pid)
        except DeviceFault as fault:  # no reply: the engine retries the window on a fresh worker
            log.error("device fault, exiting: %s", fault)
            os._exit(EXIT_DEVICE_FAULT)
        finally:
            worker.close()


def load_with_progress(spec: WorkerSpec):
    """The spec's model, ready on its device (worker.load_for_worker), with progress lines."""
    say = start_progress(spec, spec.spawned_at)
    say(f"loading {spec.model}")
    began = time.perf_counter()
    model = load_for_worker(spec)
    say(f"loaded in {time.perf_counter() - began:.1f} s")
    return model


def wait_to_begin(link: WorkerLink, engine_pid: int) -> Begin | None:
    """The engine's Begin; None when it says Shutdown instead or is gone. A standby process waits
    here, its model loaded, until it replaces a lost worker."""
    codec = Codec(ToWorker)
    while True:
        if not link.poll(ORPHAN_CHECK_MS):
            if os.getppid() != engine_pid:
                log.error("the engine (pid %d) is gone: exiting", engine_pid)
                return None
            continue
        message, _ = codec.decode([link.receive()])
        match message:
            case Begin():
                return message
            case Shutdown():
                return None
            case _:
                log.error("%s before Begin: ignored", type(message).__name__)


def start_heartbeat(beat_at: Any, period_s: float) -> None:
    """Write the time (time.monotonic(), one clock for the whole host) into `beat_at` every
    `period_s` from a daemon thread, so the beats go on while the main thread runs a long window
    (torch releases the GIL in its kernels; Python code yields it every few milliseconds) and stop
    only when the process is stopped or gone. Only this thread writes, so it needs no lock."""
    if beat_at is None:
        return

    def beat() -> None:
        while True:
            beat_at.value = time.monotonic()
            time.sleep(period_s)

    threading.Thread(target=beat, name="vitserve-heartbeat", daemon=True).start()


def _tight_sleeps() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: sleeps keep their usual slack
        pass


def serve_windows(worker: Worker, link: WorkerLink, encoder: msgspec.msgpack.Encoder, engine_pid: int) -> None:
    """Run the engine's windows until it says Shutdown (or is gone)."""
    _tight_sleeps()
    codec = Codec(ToWorker)
    running: deque[Running | Probing] = deque()  # windows (and probes) whose GPU work is queued, oldest first
    pauses = Pauses(worker.busy_poll_s, RUNNING_POLL_S)

    def send_retired() -> None:  # input slabs dropped before the oldest window still running
        for slab in worker.inputs.retire(running[0].sequence if running else None):
            link.send(encoder.encode(InputsDropped(slab)))

    def reply_oldest() -> None:
        pauses.finished(running[0])
        link.send(encoder.encode(running.popleft().reply()))
        send_retired()
        if not running:
            pauses.idle()

    stepped_at = 0  # worker.started at the last warm-up step
    while True:
        while running and running[0].finished():
            reply_oldest()
        # (Only once it has its output slabs: the engine waits for SlabsMade after WorkerReady.)
        if worker.warming and worker.slabs and (len(running) >= MAX_RUNNING or worker.started - stepped_at >= WARM_STEP_EVERY
                                                or not running and not link.poll(0)):
            stepped_at = worker.started
            if (warm := worker.warm_step()) is not None:
                link.send(encoder.encode(warm))
                freeze_start_up_objects()  # what the capture made lives as long as the process too
            continue
        if len(running) >= MAX_RUNNING:
            reply_oldest()  # full: wait for the oldest
            continue
        if running and not link.poll(0):
            if (pause := pauses.running(running[0].due)) > 0:
                time.sleep(pause)  # nothing new yet: check the oldest again shortly
            continue
        if not running and not link.poll(0) and pauses.idle_polling():
            continue  # polling for the next window (a sequential client's) for busy_poll_ms after the last reply
        if not running and not link.poll(ORPHAN_CHECK_MS):
            if os.getppid() != engine_pid:
                log.error("the engine (pid %d) is gone: exiting", engine_pid)
                return
            continue
        message, _ = codec.decode([link.receive()])
        match message:
            case Shutdown():
                break
            case RunWindow():
                running.append(pauses.due(worker.start(message), message.predicted_ms, running))
            case Probe(probe=probe):
                running.append(pauses.due(worker.probe(probe), 0.0, running))
            case MapInputs():
                worker.map_inputs(message)
            case DropInputs(slab=slab):
                worker.inputs.drop(slab, worker.started)
                if not running:
                    send_retired()
            case MakeSlabs():
                link.send(encoder.encode(worker.make_slabs(message)))
    while running:
        link.send(encoder.encode(running.popleft().reply()))
