"""The wire protocol: messages round-trip through the codecs, and anything else is a ProtocolError.

Frames are simulated the way ZeroMQ delivers them: `[header, *array frames]`, each a bytes-like
object; the codec never sees pickle or anything outside the tagged unions.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitserve.engine.frontend import _items
from vitserve.ipc import messages as m
from vitserve.ipc.codec import (
    MAX_RANK,
    WIRE_DTYPES,
    Codec,
    ProtocolError,
    array_ref,
    check_all_frames_used,
    client_codec,
    frame_array,
    server_codec,
)
from vitserve.ipc.messages import (
    ArrayRef,
    Cancel,
    Encode,
    Error,
    Health,
    HealthQuery,
    Hello,
    ImageItem,
    OutputRef,
    PatchItem,
    Release,
    Result,
    Stats,
    StatsQuery,
    VideoItem,
    Welcome,
)

CLIENT_TYPES = (Hello, Encode, Cancel, Release, StatsQuery, HealthQuery)
SERVER_TYPES = (Welcome, Result, Error, Stats, Health)


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


# -- round trips -------------------------------------------------------------------------------


def _client_messages() -> list[tuple[msgspec.Struct, list[np.ndarray]]]:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    video = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    patches = np.linspace(-1, 1, 4 * 1536, dtype=np.float32).reshape(4, 1536)
    encode = Encode(
        id=42,
        items=[
            ImageItem(array_ref(image, 0)),
            VideoItem(array_ref(video, 1)),
            PatchItem(array_ref(patches, 2), (1, 2, 2)),
        ],
        deadline_ms=250.5,
        priority=-3,
        inline=True,
    )
    return [
        (Hello(version=m.PROTOCOL_VERSION, client="tests/1.0"), []),
        (Hello(version=7), []),
        (encode, [image, video, patches]),
        (Encode(id=0, items=[ImageItem(array_ref(image, 0))]), [image]),
        (Cancel(id=42), []),
        (Release(id=2**63 - 1), []),
        (StatsQuery(), []),
        (HealthQuery(), []),
    ]


def _server_messages() -> list[tuple[msgspec.Struct, list[np.ndarray]]]:
    rows = np.arange(3 * 4 * 8, dtype=np.float32).reshape(3, 4, 8)
    return [
        (Welcome(version=1, model="qwen3-vl-2b", out_hidden=2048, num_deepstack=3, dtype="bfloat16",
                 budgets=(1024, 4096, 16384)), []),
        (Result(id=5, outputs=[OutputRef((64, 4, 2048), "bfloat16", slab="vitserve-0-1", epoch=3, offset=4096),
                               OutputRef((16, 4, 2048), "bfloat16", slab="vitserve-0-1", epoch=3, offset=0)]), []),
        (Result(id=6, outputs=[OutputRef(rows.shape, "float32", frame=0)]), [rows]),
        (Result(id=7, outputs=[]), []),
        (Error(id=None, code="protocol", message="undecodable"), []),
        (Error(id=9, code="overloaded", message="queue full", retry_after_ms=12.5), []),
        (Stats(values={"requests": 3.0, "queued_items": 0.0}), []),
        (Stats(values={}), []),
        (Health(ready=True, workers_ready=2, workers=2), []),
        (Health(ready=False, workers_ready=0, workers=1, detail="starting"), []),
    ]


def test_message_lists_cover_every_type():
    assert {type(msg) for msg, _ in _client_messages()} == set(CLIENT_TYPES)
    assert {type(msg) for msg, _ in _server_messages()} == set(SERVER_TYPES)


@pytest.mark.parametrize("message, arrays", _client_messages(), ids=lambda v: type(v).__name__)
def test_client_messages_round_trip(message, arrays):
    frames = client_codec().encode(message, arrays)
    assert len(frames) == 1 + len(arrays)
    for sent, frame in zip(arrays, frames[1:]):
        assert frame is sent  # the array goes out as is, no copy
    decoded, received = server_codec().decode(on_the_wire(frames))
    assert type(decoded) is type(message)
    assert decoded == message
    assert len(received) == len(arrays)
    for sent, frame in zip(arrays, received):
        assert isinstance(frame, memoryview)
        assert frame.tobytes() == sent.tobytes()


@pytest.mark.parametrize("message, arrays", _server_messages(), ids=lambda v: type(v).__name__)
def test_server_messages_round_trip(message, arrays):
    frames = server_codec().encode(message, arrays)
    assert len(frames) == 1 + len(arrays)
    decoded, received = client_codec().decode(on_the_wire(frames))
    assert type(decoded) is type(message)
    assert decoded == message
    assert [frame.tobytes() for frame in received] == [array.tobytes() for array in arrays]
    assert all(isinstance(frame, memoryview) for frame in received)


def test_codec_is_reusable_across_messages():
    client, server = client_codec(), server_codec()
    for message, arrays in _client_messages() * 2:
        decoded, _ = server.decode(on_the_wire(client.encode(message, arrays)))
        assert decoded == message


def test_tuple_fields_decode_as_tuples():
    image = np.zeros((2, 3, 3), np.uint8)
    frames = client_codec().encode(Encode(1, [PatchItem(array_ref(image, 0), (1, 2, 2))]), [image])
    decoded, _ = server_codec().decode(on_the_wire(frames))
    item = decoded.items[0]
    assert isinstance(item.grid_thw, tuple) and item.grid_thw == (1, 2, 2)
    assert isinstance(item.pixel_values.shape, tuple) and item.pixel_values.shape == (2, 3, 3)


def test_array_ref_describes_the_array():
    array = np.zeros((3, 4, 5), np.float16)
    assert array_ref(array, 2) == ArrayRef(frame=2, dtype="float16", shape=(3, 4, 5))
    assert array_ref(np.zeros((6,), np.uint16), 0, dtype="bfloat16") == ArrayRef(0, "bfloat16", (6,))


# -- frame_array -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float16"])
@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 3, 4), (2, 1, 3, 5), (0,), (3, 0, 2)])
def test_frame_array_is_a_read_only_view_of_the_frame(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.random(shape) * 200).astype(dtype)
    frames = on_the_wire(client_codec().encode(Encode(1, []), [np.zeros(3, np.uint8), array]))
    _, received = server_codec().decode(frames)
    view = frame_array(array_ref(array, 1), received)
    assert view.dtype == np.dtype(dtype)
    assert view.shape == shape
    np.testing.assert_array_equal(view, array)
    assert not view.flags.writeable
    if view.size:
        assert np.shares_memory(view, np.frombuffer(received[1], np.uint8))


def test_frame_array_bfloat16_is_uint16_storage():
    values = torch.tensor([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype=torch.bfloat16)
    storage = values.view(torch.int16).numpy().view(np.uint16)
    frames = on_the_wire([b"", storage])[1:]
    received = [memoryview(frame) for frame in frames]
    ref = array_ref(storage, 0, dtype="bfloat16")
    view = frame_array(ref, received)
    assert view.dtype == np.uint16 and view.shape == (2, 3)
    assert np.shares_memory(view, np.frombuffer(received[0], np.uint8))
    assert torch.equal(torch.from_numpy(view.copy()).view(torch.bfloat16), values)


def test_frame_array_is_read_only_over_a_writable_frame():
    frame = memoryview(bytearray(12))  # like a zmq.Frame received with copy=False (readonly=False)
    assert not frame.readonly
    view = frame_array(ArrayRef(0, "float32", (3,)), [frame])
    assert not view.flags.writeable


def _frames(*sizes: int) -> list[memoryview]:
    return [memoryview(bytes(size)) for size in sizes]


@pytest.mark.parametrize("frame, count", [(1, 1), (5, 2), (0, 0)])
def test_frame_array_index_out_of_range(frame, count):
    with raises_protocol("invalid_input", match=rf"frame {frame}: no such frame \(the message has {count} array",
                         request_id=11):
        frame_array(ArrayRef(frame, "uint8", (4,)), _frames(*[4] * count), request_id=11)


def test_frame_array_negative_index():
    with raises_protocol("invalid_input", match=r"frame -1: no such frame", request_id=3):
        frame_array(ArrayRef(-1, "uint8", (4,)), _frames(4), 3)


@pytest.mark.parametrize("dtype", ["int64", "float64", "bool", "object", "uint16", "", "bf16", "O"])
def test_frame_array_dtype_not_on_the_wire(dtype):
    with raises_protocol("invalid_input", match=rf"dtype '{dtype}' is not one of", request_id=4):
        frame_array(ArrayRef(0, dtype, (2,)), _frames(16), 4)


def test_wire_dtypes():
    assert set(WIRE_DTYPES) == {"uint8", "float32", "float16", "bfloat16"}
    assert MAX_RANK == 4


@pytest.mark.parametrize("shape", [(), (1, 1, 1, 1, 1), (2, 2, 2, 2, 2, 2)])
def test_frame_array_rank(shape):
    with raises_protocol("invalid_input", match=r"must have 1 to 4 non-negative dimensions", request_id=None):
        frame_array(ArrayRef(0, "uint8", shape), _frames(int(np.prod(shape))))


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (-2, -2)])
def test_frame_array_negative_dimension(shape):
    with raises_protocol("invalid_input", match=r"non-negative dimensions", request_id=8):
        frame_array(ArrayRef(0, "uint8", shape), _frames(4), 8)


@pytest.mark.parametrize("dtype, shape, nbytes, needed", [
    ("float32", (4,), 12, 16),
    ("uint8", (2, 3, 3), 19, 18),
    ("float16", (5, 2), 0, 20),
    ("bfloat16", (3,), 3, 6),
])
def test_frame_array_size_mismatch(dtype, shape, nbytes, needed):
    with raises_protocol("invalid_input", request_id=2) as info:
        frame_array(ArrayRef(0, dtype, shape), _frames(nbytes), 2)
    assert f"{nbytes} bytes" in str(info.value) and f"needs {needed}" in str(info.value)


@pytest.mark.parametrize("shape", [(2**32, 2**32), (2**62, 4), (2**61, 2**3, 1, 1)])
def test_frame_array_overflowing_shape(shape):
    with raises_protocol("invalid_input", request_id=1):
        frame_array(ArrayRef(0, "uint8", shape), _frames(0), 1)


def test_frame_array_huge_shape_message_has_the_true_size():
    with raises_protocol("invalid_input", request_id=None) as info:
        frame_array(ArrayRef(0, "uint8", (2**63,)), _frames(0))
    assert f"needs {2**63}" in str(info.value)


# -- check_all_frames_used ---------------------------------------------------------------------


def test_all_frames_used_accepts_each_frame_once_in_any_order():
    refs = [ArrayRef(2, "uint8", (1,)), ArrayRef(0, "uint8", (1,)), ArrayRef(1, "uint8", (1,))]
    check_all_frames_used(refs, _frames(1, 1, 1), 5)
    check_all_frames_used([], [], None)


def test_all_frames_used_extra_frame():
    with raises_protocol("invalid_input", match=r"references frames \[0\], but 2 array frames arrived",
                         request_id=5):
        check_all_frames_used([ArrayRef(0, "uint8", (1,))], _frames(1, 1), 5)


def test_all_frames_used_no_refs_but_frames():
    with raises_protocol("invalid_input", match=r"references frames \[\], but 1 array frames", request_id=5):
        check_all_frames_used([], _frames(1), 5)


def test_all_frames_used_frame_referenced_twice():
    refs = [ArrayRef(0, "uint8", (1,)), ArrayRef(0, "uint8", (1,))]
    with raises_protocol("invalid_input", match=r"references frames \[0, 0\], but 2 array frames.*exactly once",
                         request_id=6):
        check_all_frames_used(refs, _frames(1, 1), 6)


def test_all_frames_used_missing_frame():
    refs = [ArrayRef(0, "uint8", (1,)), ArrayRef(1, "uint8", (1,))]
    with raises_protocol("invalid_input", match=r"references frames \[0, 1\], but 1 array frames arrived",
                         request_id=7):
        check_all_frames_used(refs, _frames(1), 7)


# -- decode errors -----------------------------------------------------------------------------


def test_decode_empty_frame_list():
    for codec in (server_codec(), client_codec()):
        with raises_protocol(match="empty message"):
            codec.decode([])


@pytest.mark.parametrize("header", [
    b"", b"\xc1", b"\xc1\x00\x01", b"\x00", b"\xa3abc", b"\x92\x01\x02", b"\x81\xa4type",
    b"\xdd\xff\xff\xff\xff", b"\x81\xa4type\xa5hel", bytes(range(256)),
], ids=repr)
def test_decode_undecodable_bytes(header):
    with raises_protocol(match="undecodable message"):
        server_codec().decode([header])


def test_decode_random_bytes():
    rng = random.Random(1234)
    for _ in range(500):
        header = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        try:
            message, _ = server_codec().decode([header])
        except ProtocolError as err:
            assert err.code == "protocol" and str(err)
        else:
            assert isinstance(message, CLIENT_TYPES)


@pytest.mark.parametrize("tag", ["bogus", "", "Hello", "image", "run_window", "shutdown", "worker_ready"])
def test_decode_unknown_type_tag(tag):
    with raises_protocol(match=r"undecodable message: .*type"):
        server_codec().decode([msgspec.msgpack.encode({"type": tag, "id": 1, "version": 1})])


def test_decode_map_without_a_type():
    with raises_protocol(match="undecodable message"):
        server_codec().decode([msgspec.msgpack.encode({"id": 1})])


@pytest.mark.parametrize("message", [msg for msg, _ in _server_messages()], ids=lambda v: type(v).__name__)
def test_server_message_sent_to_the_server(message):
    frames = server_codec().encode(message)
    with raises_protocol(match="undecodable message"):
        server_codec().decode(on_the_wire(frames))


@pytest.mark.parametrize("message", [msg for msg, _ in _client_messages()], ids=lambda v: type(v).__name__)
def test_client_message_sent_to_the_client(message):
    frames = client_codec().encode(message)
    with raises_protocol(match="undecodable message"):
        client_codec().decode(on_the_wire(frames)[:1])


@pytest.mark.parametrize("value, field", [
    ({"type": "hello"}, "version"),
    ({"type": "encode", "items": []}, "id"),
    ({"type": "encode", "id": 1}, "items"),
    ({"type": "cancel"}, "id"),
    ({"type": "release"}, "id"),
    ({"type": "encode", "id": 1, "items": [{"type": "image"}]}, "pixels"),
    ({"type": "encode", "id": 1, "items": [{"type": "image", "pixels": {"frame": 0, "dtype": "uint8"}}]},
     "shape"),
    ({"type": "encode", "id": 1, "items": [{"type": "patches", "pixel_values": {
        "frame": 0, "dtype": "float32", "shape": [1]}}]}, "grid_thw"),
])
def test_decode_missing_required_field(value, field):
    with raises_protocol(match=rf"undecodable message: .*missing required field `{field}`"):
        server_codec().decode([msgspec.msgpack.encode(value)])


@pytest.mark.parametrize("value, where", [
    ({"type": "cancel", "id": "7"}, r"\$\.id"),
    ({"type": "release", "id": 1.5}, r"\$\.id"),
    ({"type": "cancel", "id": True}, r"\$\.id"),
    ({"type": "cancel", "id": None}, r"\$\.id"),
    ({"type": "hello", "version": "1"}, r"\$\.version"),
    ({"type": "hello", "version": 1, "client": 5}, r"\$\.client"),
    ({"type": "encode", "id": 1, "items": {}}, r"\$\.items"),
    ({"type": "encode", "id": 1, "items": [], "inline": "yes"}, r"\$\.inline"),
    ({"type": "encode", "id": 1, "items": [], "deadline_ms": "soon"}, r"\$\.deadline_ms"),
    ({"type": "encode", "id": 1, "items": [], "priority": 0.5}, r"\$\.priority"),
    ({"type": "encode", "id": 1, "items": [{"type": "audio"}]}, r"\$\.items\[0\]"),
    ({"type": "encode", "id": 1, "items": [
        {"type": "image", "pixels": {"frame": "0", "dtype": "uint8", "shape": [1]}}]}, r"frame"),
    ({"type": "encode", "id": 1, "items": [
        {"type": "patches", "pixel_values": {"frame": 0, "dtype": "float32", "shape": [1]},
         "grid_thw": [1, 2]}]}, r"grid_thw"),
    ({"type": "encode", "id": 1, "items": [
        {"type": "patches", "pixel_values": {"frame": 0, "dtype": "float32", "shape": [1]},
         "grid_thw": [1, 2, 2, 2]}]}, r"grid_thw"),
])
def test_decode_wrong_field_type(value, where):
    with raises_protocol(match=rf"undecodable message: .*{where}"):
        server_codec().decode([msgspec.msgpack.encode(value)])


def test_decode_leaves_frames_alone_and_ignores_unknown_fields():
    header = msgspec.msgpack.encode({"type": "cancel", "id": 3, "future_field": [1, {"a": 2}]})
    message, arrays = server_codec().decode([header, b"abc", bytearray(b"de")])
    assert message == Cancel(3)
    assert [a.tobytes() for a in arrays] == [b"abc", b"de"]


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_decode_deeply_nested_unknown_field(depth):
    header = (b"\x83" + msgspec.msgpack.encode("type") + msgspec.msgpack.encode("hello")
              + msgspec.msgpack.encode("version") + b"\x01" + msgspec.msgpack.encode("extra")
              + b"\x91" * depth + b"\xc0")
    with raises_protocol(match="undecodable message"):
        server_codec().decode([header])


def test_decode_deeply_nested_header_in_place_of_a_map():
    with raises_protocol(match="undecodable message"):
        server_codec().decode([b"\x91" * 100_000 + b"\xc0"])


def test_codec_decodes_only_its_union():
    codec = Codec(Cancel)
    assert codec.decode([msgspec.msgpack.encode(Cancel(1))])[0] == Cancel(1)
    with raises_protocol(match="undecodable"):
        codec.decode([msgspec.msgpack.encode(Release(1))])


# -- the Frontend's _items ----------------------------------------------------------------------


def _request(items: list, arrays: list[np.ndarray], request_id: int = 77) -> tuple[Encode, list[memoryview]]:
    frames = client_codec().encode(Encode(request_id, items), arrays)
    message, received = server_codec().decode(on_the_wire(frames))
    return message, received


def test_items_image_video_patches():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    video = np.random.default_rng(1).integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    patches = np.random.default_rng(2).random((8, 1536), dtype=np.float32)
    message, arrays = _request(
        [VideoItem(array_ref(video, 1)), PatchItem(array_ref(patches, 2), (2, 2, 2)), ImageItem(array_ref(image, 0))],
        [image, video, patches],
    )
    got_video, got_patches, got_image = _items(message, arrays)
    np.testing.assert_array_equal(got_video, video)
    np.testing.assert_array_equal(got_image, image)
    assert isinstance(got_patches, tuple) and len(got_patches) == 2
    values, grid = got_patches
    assert grid == (2, 2, 2)
    assert values.dtype == np.float32 and values.shape == (8, 1536)
    np.testing.assert_array_equal(values, patches)
    for array, frame in ((got_image, arrays[0]), (got_video, arrays[1]), (values, arrays[2])):
        assert np.shares_memory(array, np.frombuffer(frame, np.uint8))  # no copy


def test_items_image_with_four_dims():
    good = np.zeros((4, 4, 3), np.uint8)
    bad = np.zeros((1, 4, 4, 3), np.uint8)
    message, arrays = _request([ImageItem(array_ref(good, 0)), ImageItem(array_ref(bad, 1))], [good, bad])
    with raises_protocol("invalid_input", match=r"item 1: ImageItem must be uint8 H×W×3, got uint8 with shape "
                                                r"\[1, 4, 4, 3\]", request_id=77):
        _items(message, arrays)


def test_items_float32_image():
    bad = np.zeros((4, 4, 3), np.float32)
    message, arrays = _request([ImageItem(array_ref(bad, 0))], [bad], request_id=3)
    with raises_protocol("invalid_input", match=r"item 0: ImageItem must be uint8 H×W×3, got float32",
                         request_id=3):
        _items(message, arrays)


def test_items_video_with_three_dims():
    image = np.zeros((4, 4, 3), np.uint8)
    message, arrays = _request([ImageItem(array_ref(image, 0)), ImageItem(array_ref(image, 1)),
                                VideoItem(array_ref(image, 2))], [image, image, image])
    with raises_protocol("invalid_input", match=r"item 2: VideoItem must be uint8 T×H×W×3, got uint8 with shape "
                                                r"\[4, 4, 3\]", request_id=77):
        _items(message, arrays)


def test_items_bfloat16_image():
    bad = np.zeros((4, 4, 3), np.uint16)
    message, arrays = _request([ImageItem(array_ref(bad, 0, dtype="bfloat16"))], [bad])
    with raises_protocol("invalid_input", match=r"item 0: ImageItem must be uint8", request_id=77):
        _items(message, arrays)


def test_items_bad_frame_reference():
    image = np.zeros((4, 4, 3), np.uint8)
    message, arrays = _request([ImageItem(ArrayRef(1, "uint8", (4, 4, 3)))], [image])
    with raises_protocol("invalid_input", match=r"frame 1: no such frame", request_id=77):
        _items(message, arrays)


def test_items_unreferenced_frame():
    image = np.zeros((4, 4, 3), np.uint8)
    message, arrays = _request([ImageItem(array_ref(image, 0))], [image, image])
    with raises_protocol("invalid_input", match=r"references frames \[0\], but 2 array frames", request_id=77):
        _items(message, arrays)


def test_items_shared_frame():
    image = np.zeros((4, 4, 3), np.uint8)
    message, arrays = _request([ImageItem(array_ref(image, 0)), ImageItem(array_ref(image, 0))], [image])
    with raises_protocol("invalid_input", match=r"references frames \[0, 0\]", request_id=77):
        _items(message, arrays)


# -- fuzz ----------------------------------------------------------------------------------------

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
def _maps_or_lists(draw):
    value = draw(_values)
    if draw(st.booleans()):
        value = draw(st.dictionaries(_keys, _values, max_size=6))
        if draw(st.integers(0, 3)):
            value["type"] = draw(st.sampled_from(_TAGS))
    return value


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
@given(_maps_or_lists())
def test_fuzz_msgpack_values(value):
    _assert_decodes_or_protocol_error(msgspec.msgpack.encode(value))


def test_items_overflowing_shape_is_invalid_input():
    header = msgspec.msgpack.encode(
        {"type": "encode", "id": 9, "items": [
            {"type": "image", "pixels": {"frame": 0, "dtype": "uint8", "shape": [2**32, 2**32, 3]}}]})
    message, arrays = server_codec().decode([header, b""])
    with raises_protocol("invalid_input", request_id=9):
        _items(message, arrays)
