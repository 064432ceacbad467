"""The wire protocol under fuzzing: random bytes and random msgpack values decode to one of the
client messages or fail with a ProtocolError, never anything else."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire_helpers import CLIENT_TYPES, maps_or_lists, raises_protocol

from vitserve.engine.client_requests import _items
from vitserve.ipc.codec import ProtocolError, server_codec

def _assert_decodes_or_protocol_error(header: bytes) -> None:
    try:
        message, arrays = server_codec().decode([header])
    except ProtocolError as err:
        assert err.code == "protocol" and err.request_id is None and str(err)
    else:
        assert isinstance(message, CLIENT_TYPES)
        assert arrays == []


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(header):
    _assert_decodes_or_protocol_error(header)


@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(maps_or_lists())
def test_fuzz_msgpack_values(value):
    _assert_decodes_or_protocol_error(msgspec.msgpack.encode(value))


def test_items_overflowing_shape_is_invalid_input():
    header = msgspec.msgpack.encode(
        {"type": "encode", "id": 9, "items": [
            {"type": "image", "pixels": {"frame": 0, "dtype": "uint8", "shape": [2**32, 2**32, 3]}}]})
    message, arrays = server_codec().decode([header, b""])
    with raises_protocol("invalid_input", request_id=9):
        _items(message, arrays)
