"""A ZeroMQ socket for asyncio that sends without a future and receives in bursts.

pyzmq's asyncio sockets create a future and re-arm the event loop's reader for every call: tens
of microseconds, which under load bound the request rate well below what ZeroMQ itself moves.
A `BurstSocket` wraps a plain socket: it sends at once whenever the pipe has room, and after
one wake-up takes every message that has already arrived, so the event loop is involved once
per burst instead of once per message.

ZeroMQ's descriptor is edge-triggered: it signals that the socket's events *changed*, and any
send or receive may consume that signal. So a waiter re-checks the socket's events before it
sleeps, and every operation wakes the waiters when it leaves events pending.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import zmq

MAX_BURST = 256  # messages taken per wake-up, so one busy peer cannot starve the loop's other work
# Plain ints: pyzmq's are enum flags, and `int & flag` builds a new flag each time (microseconds).
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)


class BurstSocket:
    def __init__(self, socket: zmq.Socket):
        if isinstance(socket, zmq.Socket) and type(socket).__module__.startswith("zmq.asyncio"):
            raise TypeError("BurstSocket wraps a plain zmq.Socket (from zmq.Context), not an asyncio socket")
        self.socket = socket
        self._waiters: list[tuple[int, asyncio.Future]] = []  # (zmq event awaited, its future)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._interrupted = False
        self._in_a_row = False  # the last receive found messages waiting: the loop has had no turn since

    # -- sending -----------------------------------------------------------------------------
    def send_now(self, frames: Sequence[Any]) -> bool:
        """Send if the pipe has room; False when it is full (or, on a PAIR socket, has no peer)."""
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        finally:
            self._wake_if_pending()
        return True

    async def send(self, frames: Sequence[Any]) -> None:
        """Send, waiting for room when the pipe is full."""
        while not self.send_now(frames):
            await self._until(POLLOUT)

    # -- receiving ---------------------------------------------------------------------------
    async def receive(self, timeout_s: float | None = None) -> list[list[zmq.Frame]]:
        """The messages that have arrived: at least one, or none once `timeout_s` has passed.
        A receive that finds messages waiting right after one that did lets the event loop take a
        turn first: a peer that keeps the socket busy cannot starve the loop's other work (an
        await that does not suspend gives the loop no turn)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            burst = self._take()
            if burst and self._in_a_row:
                await asyncio.sleep(0)
            self._in_a_row = bool(burst)
            if burst or self._interrupted or (deadline is not None and loop.time() >= deadline):
                self._interrupted = False
                return burst
            await self._until(POLLIN, deadline)

    def interrupt(self) -> None:
        """Have a `receive` waiting now (or the next one) return at once, with what has arrived (maybe
        nothing): its caller has something else to look at (e.g. the peer's process ended)."""
        self._interrupted = True
        for _, future in self._waiters:
            _resolve(future)
        self._waiters = []

    async def receive_one(self, timeout_s: float | None = None) -> list[zmq.Frame]:
        """One message (for handshakes); raises TimeoutError when none arrives in time."""
        async def one() -> list[zmq.Frame]:
            while True:
                try:
                    return self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    await self._until(POLLIN)
                finally:
                    self._wake_if_pending()

        return await asyncio.wait_for(one(), timeout_s)

    def take(self) -> list[list[zmq.Frame]]:
        """The messages that have arrived, without waiting (none, maybe)."""
        return self._take()

    def _take(self) -> list[list[zmq.Frame]]:
        # Asking for the events first: a receive that finds nothing raises zmq.Again, which costs
        # several times as much as reading the events.
        burst = []
        socket = self.socket
        while len(burst) < MAX_BURST:
            events = socket.get(zmq.EVENTS)
            if not events & POLLIN:
                self._wake(events)  # (this read may have consumed a signal a sender waits for)
                break
            burst.append(socket.recv_multipart(flags=zmq.NOBLOCK, copy=False))
        else:
            self._wake_if_pending()
        return burst

    # -- waiting -----------------------------------------------------------------------------
    async def _until(self, event: int, deadline: float | None = None) -> None:
        """Return once the socket may have `event`, or at `deadline` (loop time); callers retry, so
        a spurious wake is harmless."""
        events = self.socket.get(zmq.EVENTS)  # this read may consume a signal other waiters need:
        self._wake(events)  # pass it on before sleeping
        if events & event:
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            loop.add_reader(self.socket.get(zmq.FD), self._on_signal)
            self._loop = loop
        waiter = (event, loop.create_future())
        self._waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _resolve, waiter[1])
        try:
            await waiter[1]
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _on_signal(self) -> None:
        # Reading EVENTS makes ZeroMQ process its commands, which clears the descriptor's signal
        # (the event loop would spin on it otherwise).
        self._wake(self.socket.get(zmq.EVENTS))

    def _wake_if_pending(self) -> None:
        if self._waiters:
            self._wake(self.socket.get(zmq.EVENTS))

    def _wake(self, events: int) -> None:
        """Wake the waiters whose event is pending."""
        waiting = []
        for event, future in self._waiters:
            if events & event:
                _resolve(future)
            else:
                waiting.append((event, future))
        self._waiters = waiting

    def close(self, linger_ms: int = 0) -> None:
        """Stop watching the descriptor and close the socket; messages not yet sent are dropped
        (or, with `linger_ms`, get that long to go out when the context terminates)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.socket.get(zmq.FD))
        self._loop = None
        for _, future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters = []
        self.socket.close(linger_ms)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
