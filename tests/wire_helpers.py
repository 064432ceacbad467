"""Helpers shared by the wire-protocol tests: what a peer receives, and a ProtocolError checker."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from vitserve.ipc.codec import ProtocolError
from vitserve.ipc.messages import Cancel, Encode, HealthQuery, Hello, Release, StatsQuery

CLIENT_TYPES = (Hello, Encode, Cancel, Release, StatsQuery, HealthQuery)  # what a server may receive


def on_the_wire(frames: list) -> list[bytes]:
    """What the peer receives: every frame as plain bytes."""
    return [bytes(memoryview(frame)) for frame in frames]


@contextmanager
def raises_protocol(code: str = "protocol", match: str | None = None, request_id: int | None = None):
    """pytest.raises(ProtocolError) that also checks the error's code, request id and message."""
    with pytest.raises(ProtocolError, match=match) as info:
        yield info
    err = info.value
    assert err.code == code, (err.code, str(err))
    assert err.request_id == request_id
    assert str(err), "a ProtocolError must carry a message"
