"""The wire protocol: messages round-trip through the codecs, and anything else is a ProtocolError.

Frames are simulated the way ZeroMQ delivers them: `[header, *array frames]`, each a bytes-like
object; the codec never sees pickle or anything outside the tagged unions.
"""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from wire_helpers import CLIENT_TYPES, on_the_wire, raises_protocol

from vitserve.ipc import messages as m
from vitserve.ipc.codec import Codec, ProtocolError, array_ref, client_codec, server_codec
from vitserve.ipc.messages import (
    ArrayRef,
    Cancel,
    Encode,
    Error,
    Forget,
    Found,
    Health,
    HealthQuery,
    Hello,
    ImageItem,
    Lookup,
    OutputRef,
    PatchItem,
    Release,
    Result,
    ServedModel,
    Stats,
    StatsQuery,
    VideoItem,
    Welcome,
)

SERVER_TYPES = (Welcome, Result, Found, Error, Stats, Health)


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
        (Encode(id=1, items=[ImageItem(array_ref(image, 0)), ImageItem(array_ref(image, 1))], keep=["uuid-1", ""],
                keep_s=30.0), [image, image]),
        (Lookup(id=3, names=["uuid-1", "lora:uuid-2"], inline=True), []),
        (Forget(names=["uuid-1"]), []),
        (Cancel(id=42), []),
        (Release(ids=[1, 2**63 - 1]), []),
        (StatsQuery(), []),
        (HealthQuery(), []),
    ]


def _server_messages() -> list[tuple[msgspec.Struct, list[np.ndarray]]]:
    rows = np.arange(3 * 4 * 8, dtype=np.float32).reshape(3, 4, 8)
    return [
        (Welcome(version=1, model=ServedModel(
            source="random:qwen3-vl-2b", model_type="qwen3_vl", fingerprint="0f" * 16, dtype="bfloat16", out_hidden=2048,
            num_deepstack=3, budgets=(1024, 4096, 16384), item_token_limit=32768,
            preprocess={"patch_size": 16, "image_mean": [0.5, 0.5, 0.5]})), []),
        (Result(id=5, outputs=[OutputRef((64, 4, 2048), "bfloat16", "image", (1, 16, 16), slab="vitserve-0-1", epoch=3,
                                         offset=4096),
                               OutputRef((16, 4, 2048), "bfloat16", "video", (2, 4, 8), slab="vitserve-0-1", epoch=3,
                                         offset=0)]), []),
        (Result(id=6, outputs=[OutputRef(rows.shape, "float32", "patches", (1, 2, 6), frame=0)]), [rows]),
        (Result(id=7, outputs=[]), []),
        (Found(id=8, outputs=[None, OutputRef(rows.shape, "float32", "image", (1, 2, 6), frame=0)]), [rows]),
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
    ({"type": "release"}, "ids"),
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
    ({"type": "release", "ids": [1.5]}, r"\$\.ids"),
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
        codec.decode([msgspec.msgpack.encode(Release([1]))])
