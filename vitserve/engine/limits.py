"""What one client of `vitserve serve` may use, so that no client can crowd out the others.

A client is one connection. Its unfinished requests may hold at most `queue_share` of the
queue's items, tokens and bytes, and its results (running, or delivered and not yet released)
at most `output_share` of a worker's shared-memory output rows: past either it gets
`overloaded` with a retry hint, while other clients still find room. A request larger than a
client's whole share gets `too_large`, naming the setting. Within a priority, clients' requests
without deadlines are served in fair turns (start-time fair queuing over tokens), so a client
that queues an hour of work does not go ahead of a newcomer's single image. Priorities outside
`priorities` are refused.

A local (ipc://) client writes its inputs into an input arena of its own, `input_arena_bytes` of
shared memory that the workers read in place (ipc/input_slabs.py); at most `max_input_arenas`
exist at once (on GPUs they are page-locked memory). A client without one, or whose arena is full,
sends its inputs as frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitserve.checks import check_int


@dataclass(frozen=True)
class ClientLimits:
    max_connections: int = 1024  # connections that have said hello; more are refused with `overloaded`
    max_requests: int = 1024  # requests per connection, unfinished or holding a result
    queue_share: float = 0.5  # of the queue's bounds (items, tokens, bytes) one client's requests may take
    output_share: float = 0.5  # of a worker's output rows one client's results may hold
    max_inline_bytes: int = 1 << 30  # inline result bytes sent to a client and not yet released by it
    priorities: tuple[int, int] = (-100, 100)  # lowest and highest priority a client may ask for
    input_arena_bytes: int = 512 << 20  # each local client's input arena; 0: none, inputs go as frames
    max_input_arenas: int = 8  # arenas at once (page-locked on GPUs: 4 GiB); further clients send frames

    def __post_init__(self) -> None:
        check_int("max_connections", self.max_connections, 1, "connections served at once")
        check_int("max_requests", self.max_requests, 1, "requests one connection may have open")
        check_int("max_inline_bytes", self.max_inline_bytes, 1, "inline result bytes a client may leave unread")
        check_int("input_arena_bytes", self.input_arena_bytes, 0, "each local client's input arena; 0: none")
        check_int("max_input_arenas", self.max_input_arenas, 0, "input arenas at once")
        for name in ("queue_share", "output_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}: what one client may take")
        low_high = self.priorities
        if (not isinstance(low_high, tuple) or len(low_high) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in low_high) or low_high[0] > low_high[1]):
            raise ValueError(f"priorities must be (lowest, highest) integers with lowest <= highest, got {low_high!r}")
