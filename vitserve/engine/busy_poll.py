"""Polling for messages instead of sleeping while one is expected (EngineConfig.busy_poll_ms).

A process blocked on a socket is woken by the kernel when a message arrives; when its CPU has
gone idle meanwhile, that wake-up costs tens to hundreds of microseconds (on the H200 host, a
virtual machine, a Unix-socket message to a process idle for 4 ms took 54 µs at the median and
184 µs at the 90th percentile, against 14 µs to one polling for it: tools/wake_latency.py). A
sequential request waits for two such wake-ups in the engine's traffic with its worker, and a
woken process runs its next steps on cold caches too. The engine knows when each window's reply
is due (the scheduler's prediction, corrected by what replies took: LearnedDue), so from a little
before that time until the reply comes, its event loop polls: a task that yields at once, each
turn of the loop asking the kernel for ready sockets without waiting. It polls for busy_poll after
its last window's reply too, when a sequential client's next request comes. Other tasks and
callbacks run as always; the cost is one core for that short time, at most `lead + 2 busy_poll`
per window.
"""

from __future__ import annotations

import asyncio

from vitserve.workers.running import POLL_LEAD_SHARE, LearnedDue


# A loop's timer may fire this much before its time (uvloop counts in whole milliseconds): a reply
# whose polling begins within it is due when its timer fires.
TIMER_SLACK_S = 0.0015
MAX_EXPECTED = 4096  # windows awaiting replies that the poller remembers (a few per worker are in flight)


class BusyPolling:
    def __init__(self, busy_poll_s: float):
        self.busy_poll_s = busy_poll_s
        self._expected: dict[int, tuple[float, float]] = {}  # window -> (poll from, poll until), loop time
        self._sent: dict[int, tuple[float, float]] = {}  # window -> (loop time sent, predicted seconds to its reply)
        self._learned = LearnedDue()  # how the replies' times compare with the scheduler's predictions
        self._idle_until = 0.0  # loop time: polling for a request after the last reply, until then
        self._task: asyncio.Task | None = None
        self.turns = 0  # loop turns spent polling (diagnostics, and tests)
        self.replies = self.replies_polled = 0  # windows answered; of them, while the loop polled for them

    def expect(self, window: int, sent: float, predicted_due: float) -> None:
        """The reply to `window`, sent at `sent`, is predicted at `predicted_due` (loop time; corrected
        by what replies took so far): poll for it from a little before, until it comes or busy_poll_s
        after it is due."""
        if self.busy_poll_s <= 0:
            return
        if len(self._sent) > MAX_EXPECTED:  # windows of a lost worker, never answered
            self._sent.clear()
        self._sent[window] = (sent, predicted_due - sent)
        due = self._learned.due(sent, predicted_due - sent)
        begin = due - POLL_LEAD_SHARE * self.busy_poll_s
        self._expected[window] = (begin, due + self.busy_poll_s)
        asyncio.get_running_loop().call_at(begin, self._begin)

    def arrived(self, window: int, now: float) -> None:
        self.replies += 1
        self.replies_polled += self._task is not None
        self._expected.pop(window, None)
        if (sent := self._sent.pop(window, None)) is not None:
            self._learned.learn(*sent, now)

    def idle(self) -> None:
        """No window is in flight any more: poll for busy_poll_s, for a sequential client's next request."""
        if self.busy_poll_s <= 0:
            return
        self._idle_until = asyncio.get_running_loop().time() + self.busy_poll_s
        self._begin()

    def _begin(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="vitserve-busy-polling")

    def _due_now(self, now: float) -> bool:
        """Whether a reply or a request is due now; forgets the replies past their polling (a worker
        lost meanwhile)."""
        due = now < self._idle_until
        for window, (begin, until) in list(self._expected.items()):
            if now >= until:
                del self._expected[window]
            elif now >= begin - TIMER_SLACK_S:
                due = True
        return due

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._due_now(loop.time()):
                self.turns += 1
                await asyncio.sleep(0)  # a turn of the loop whose poll of the sockets does not wait
        finally:
            self._task = None  # (replies due later start it again: their timers are set)

    def close(self) -> None:
        self._expected.clear()
        self._sent.clear()
        self._idle_until = 0.0
        if self._task is not None:
            self._task.cancel()
