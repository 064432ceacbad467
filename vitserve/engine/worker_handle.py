"""The engine's side of one worker process: spawn it, await its readiness handshake with a
timeout, send windows, receive completions, watch its heartbeat, stop it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

import msgspec
import msgspec.structs

from vitserve.ipc.codec import Codec, ProtocolError
from vitserve.ipc.link import EngineLink, LinkError
from vitserve.ipc.worker_messages import (
    Begin, FromWorker, MakeSlabs, Shutdown, SlabsMade, WorkerLoaded, WorkerReady, WorkerStartFailed,
)
from vitserve.ipc.sealed import SealError, reopen_read_only
from vitserve.launch import WorkerSpec, spawn
from vitserve.workers.process import worker_main

from .liveness import Heartbeat

log = logging.getLogger(__name__)


STARTUP_POLL_S = 0.2  # how often start-up checks that the process is still alive
SEND_RETRY_S = 0.01  # how often Begin is offered again to a process that has not connected yet


class WorkerStartError(RuntimeError):
    pass


class WorkerHandle:
    def __init__(self, spec: WorkerSpec, started=None):
        """`started`: (spec, process, heartbeat) of a process already spawned for `spec` (launch.py's
        early workers), adopted instead of spawning one."""
        if started is not None:
            self.spec, self.process, self.heartbeat = started
        else:
            self.heartbeat = Heartbeat(spec.heartbeat_s)  # one per process: a restart starts afresh
            self.spec, self.process = dataclasses.replace(spec, beat_at=self.heartbeat.beat_at), None
        self.worker = spec.worker
        self.link = EngineLink(spec.endpoint)
        self.ready: WorkerReady | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._codec = Codec(FromWorker)

    def spawn(self) -> None:
        """Start the process: it loads the model and waits for `start` (a standby waits long)."""
        if self.process is None:
            self.spec, self.process = spawn(self.spec, worker_main)

    async def start(self, timeout_s: float, begin: Begin) -> WorkerReady:
        """Have the process (spawned now unless it was before) get ready with `begin`'s settings,
        and wait for its handshake; raise WorkerStartError saying what failed."""
        self.spawn()
        where = f"worker {self.worker} ({self.spec.model} on {self.spec.device})"
        deadline = asyncio.get_running_loop().time() + timeout_s
        # The link takes the message once the process has connected: until then, keep checking
        # that it is alive (one that died before it connected never will).
        begin = self._encoder.encode(msgspec.structs.replace(begin, sent_at=time.monotonic()))
        while not self.link.send_now(begin):
            self._check_starting(where, deadline, timeout_s)
            await asyncio.sleep(SEND_RETRY_S)
        while True:
            try:
                message = self.decode(await self.link.receive_one(STARTUP_POLL_S))
                if not isinstance(message, WorkerLoaded):  # (loaded: what the standby watch waits for)
                    break
                continue
            except asyncio.TimeoutError:
                pass
            self._check_starting(where, deadline, timeout_s)
        match message:
            case WorkerReady():
                self.ready = message
                return message
            case WorkerStartFailed(message=problem):
                self.kill()
                raise WorkerStartError(f"{where} failed to start: {problem}")
        self.kill()
        raise WorkerStartError(f"{where} sent {type(message).__name__} instead of its readiness report")

    def _check_starting(self, where: str, deadline: float, timeout_s: float) -> None:
        """WorkerStartError when the starting process has exited or is past the deadline (loop time)."""
        if not self.process.is_alive():
            raise WorkerStartError(f"{where} exited with code {self.process.exitcode} before it was ready; "
                                   f"see its log above")
        if asyncio.get_running_loop().time() > deadline:
            self.kill()
            raise WorkerStartError(f"{where} was not ready within {timeout_s:.0f} s (loading the model); "
                                   f"raise startup_timeout_s or check the device")

    async def loaded(self) -> str:
        """Wait until the process has loaded its model (a standby, before `start`): "" or the problem
        (also when the process has exited)."""
        while True:
            try:
                message = self.decode(await self.link.receive_one(STARTUP_POLL_S))
            except asyncio.TimeoutError:
                if not self.alive():
                    return f"exited with code {self.process.exitcode}"
                continue
            if isinstance(message, WorkerLoaded):
                return message.problem

    async def make_slabs(self, plan: list[tuple[str, int]], timeout_s: float) -> list[int]:
        """Have the worker make and seal its output slabs (name, bytes); the engine's own read-only
        descriptors of them, opened through /proc (the worker is ours: same user, same pid namespace).
        WorkerStartError saying what failed."""
        where = f"worker {self.worker} ({self.spec.device})"
        await self.send(MakeSlabs(plan))
        try:
            message = self.decode(await self.link.receive_one(timeout_s))
        except asyncio.TimeoutError:
            raise WorkerStartError(f"{where} did not make its output slabs within {timeout_s:.0f} s") from None
        if not isinstance(message, SlabsMade):
            raise WorkerStartError(f"{where} sent {type(message).__name__} instead of its output slabs")
        if message.problem or len(message.descriptors) != len(plan):
            raise WorkerStartError(f"{where} could not make its output slabs: {message.problem or message}")
        descriptors: list[int] = []
        try:
            for (name, size), fd in zip(plan, message.descriptors):
                descriptors.append(reopen_read_only(self.process.pid, fd, name, size))
        except SealError as err:
            for fd in descriptors:
                os.close(fd)
            raise WorkerStartError(f"{where}: {err}") from None
        return descriptors

    async def send(self, message: msgspec.Struct) -> None:
        await self.link.send(self._encoder.encode(message))

    def send_now(self, message: msgspec.Struct) -> bool:
        """Send without waiting; False when the worker's end of the link is gone."""
        return self.link.send_now(self._encoder.encode(message))

    async def receive(self, timeout_s: float) -> list[msgspec.Struct]:
        """The messages that have arrived (at least one), or none after `timeout_s`."""
        return [self.decode(message) for message in await self.link.receive(timeout_s)]

    def decode(self, message: bytes) -> msgspec.Struct:
        try:
            message, _ = self._codec.decode([message])
        except ProtocolError as err:  # our own worker: a bug, not a client's fault
            raise RuntimeError(f"worker {self.worker} sent an unreadable message: {err}") from None
        return message

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            try:
                await asyncio.wait_for(self.send(Shutdown()), 1.0)
                await asyncio.to_thread(self.process.join, timeout_s)
            except (asyncio.TimeoutError, LinkError):
                pass
        await self.close()

    async def close(self) -> None:
        """Kill the process if it still runs and close the link."""
        if self.alive():
            await asyncio.to_thread(self.kill)
        self.link.close()

    def kill(self, wait: bool = True) -> None:
        """SIGKILL (which ends a stopped process too); without `wait`, the process is reaped later
        (by `close`, off the event loop), so a process slow to die cannot stall the engine."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            if wait:
                self.process.join(5)
