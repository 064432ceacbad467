"""BurstSocket: sends without futures, receives in bursts, and never sleeps through a pending event."""

from __future__ import annotations

import asyncio
import time

import zmq

from vitserve.ipc.burst import MAX_BURST, BurstSocket


def pair(tmp_path) -> tuple[zmq.Context, BurstSocket, zmq.Socket]:
    context = zmq.Context()
    ours = BurstSocket(context.socket(zmq.PAIR))
    ours.socket.bind(f"ipc://{tmp_path}/pair")
    peer = context.socket(zmq.PAIR)
    peer.connect(f"ipc://{tmp_path}/pair")
    return context, ours, peer


def test_messages_that_arrived_together_come_as_one_burst(tmp_path):
    async def run() -> list:
        context, ours, peer = pair(tmp_path)
        try:
            for i in range(5):
                peer.send(b"%d" % i)
            time.sleep(0.1)  # all five delivered before the first receive
            burst = await asyncio.wait_for(ours.receive(), 5)
            await ours.send([b"reply"])
            assert peer.poll(5000) and peer.recv() == b"reply"
            return [frames[0].bytes for frames in burst]
        finally:
            ours.close()
            peer.close(0)
            context.term()

    assert asyncio.run(run()) == [b"0", b"1", b"2", b"3", b"4"]


def test_a_waiter_reading_the_events_passes_on_a_signal_meant_for_another(tmp_path):
    """Reading EVENTS consumes the descriptor's signal. A sender that checks for room after a message
    has arrived must wake the sleeping receiver, or no signal would ever come again for it."""
    async def run() -> bytes:
        context, ours, peer = pair(tmp_path)
        try:
            receiving = asyncio.ensure_future(ours.receive())
            await asyncio.sleep(0.05)  # the receiver sleeps, waiting for POLLIN
            peer.send(b"hello")
            time.sleep(0.05)  # delivered while the event loop is not looking
            await ours._until(zmq.POLLOUT)  # a sender checks for room first: reads EVENTS
            burst = await asyncio.wait_for(receiving, 5)
            return burst[0][0].bytes
        finally:
            ours.close()
            peer.close(0)
            context.term()

    assert asyncio.run(run()) == b"hello"


def test_receive_with_a_timeout_returns_nothing_then_still_receives(tmp_path):
    async def run() -> tuple[list, float, list]:
        context, ours, peer = pair(tmp_path)
        try:
            began = time.perf_counter()
            empty = await ours.receive(timeout_s=0.05)
            waited = time.perf_counter() - began
            asyncio.get_running_loop().call_later(0.02, peer.send, b"late")
            burst = await ours.receive(timeout_s=5.0)
            return empty, waited, [frames[0].bytes for frames in burst]
        finally:
            ours.close()
            peer.close(0)
            context.term()

    empty, waited, late = asyncio.run(run())
    assert empty == [] and 0.04 <= waited < 1.0
    assert late == [b"late"]


def test_a_socket_that_stays_busy_leaves_the_loop_turns_for_other_work(tmp_path):
    """An await that does not suspend gives the event loop no turn: a reader that always finds
    messages waiting (a flooding client) must still let the loop run its other tasks between bursts."""
    total = 3 * MAX_BURST + 10

    async def run() -> list[int]:
        context, ours, peer = pair(tmp_path)
        received, seen_by_other_task = 0, []

        async def other_task() -> None:
            while True:
                seen_by_other_task.append(received)
                await asyncio.sleep(0)

        try:
            for i in range(total):
                peer.send(b"%d" % i)
            time.sleep(0.2)  # all delivered: every receive finds messages waiting
            other = asyncio.ensure_future(other_task())
            await asyncio.sleep(0)  # (it runs once before the reader starts)
            while received < total:
                received += len(await ours.receive())  # (no wait_for: its task would give the loop turns)
            other.cancel()
            return seen_by_other_task
        finally:
            ours.close()
            peer.close(0)
            context.term()

    seen = asyncio.run(run())
    assert any(0 < count < total for count in seen), f"the other task ran only at {seen} of {total} messages"
