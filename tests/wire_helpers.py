"""Helpers shared by the wire-protocol tests: what a peer receives, a ProtocolError checker, and
hypothesis strategies for message-like msgpack values."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from hypothesis import strategies as st

from vitserve.ipc.codec import WIRE_DTYPES, ProtocolError
from vitserve.ipc.messages import Cancel, Encode, Forget, HealthQuery, Hello, Lookup, Release, StatsQuery

CLIENT_TYPES = (Hello, Encode, Lookup, Forget, Cancel, Release, StatsQuery, HealthQuery)  # what a server may receive


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


_TAGS = ["hello", "encode", "cancel", "release", "stats", "health", "image", "video", "patches",
         "welcome", "result", "error", "stats_reply", "health_reply", "run_window", "shutdown"]
_FIELDS = ["type", "version", "client", "id", "items", "deadline_ms", "priority", "inline", "pixels", "frames",
           "pixel_values", "grid_thw", "frame", "dtype", "shape"]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(_TAGS + list(WIRE_DTYPES))
)
_keys = st.sampled_from(_FIELDS) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=30,
)


@st.composite
def maps_or_lists(draw):
    """Arbitrary msgpack values, often maps that look like messages (a known tag, known fields)."""
    value = draw(_values)
    if draw(st.booleans()):
        value = draw(st.dictionaries(_keys, _values, max_size=6))
        if draw(st.integers(0, 3)):
            value["type"] = draw(st.sampled_from(_TAGS))
    return value
