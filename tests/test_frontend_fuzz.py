"""The frontend under fuzzing: 10,000 generated messages on one connection to a live `vitserve
serve` (random bytes, random msgpack values, and well-formed messages with random fields and
frames, most of them wrong in some way). Every reply must be a valid server message, every
error must carry a code and a message, the connection must stay usable throughout, and
afterwards the engine must still give the right embeddings for a valid request."""

from __future__ import annotations

import math
import time
import typing

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import RawPeer, served
from wire_helpers import maps_or_lists

from vitserve import Client
from vitserve.ipc.codec import WIRE_DTYPES, array_ref, client_codec
from vitserve.ipc.messages import (PROTOCOL_VERSION, ArrayRef, Cancel, Encode, Error, ErrorCode, HealthQuery, Hello,
                                   ImageItem, PatchItem, Release, Result, Stats, StatsQuery, VideoItem)
from vitserve.models import load_model
from vitserve.preprocess import preprocess_image

EXAMPLES = 10_000
PATCH_DIM = 3 * 2 * 16 * 16
CODES = set(typing.get_args(ErrorCode))
_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(0, 20)
_dims = st.integers(0, 40) | st.integers(-3, 2**40)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/fuzz.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "1024", "--max-request-bytes", str(1 << 20)):
        yield endpoint


@st.composite
def array_frames(draw, count: int) -> tuple[list[ArrayRef], list[bytes]]:
    """References and frames: usually consistent (so admission runs), sometimes not."""
    refs, frames = [], []
    for index in range(count):
        dtype = draw(st.sampled_from([*WIRE_DTYPES, "uint8", "uint8", "int64", "object"]))
        shape = tuple(draw(st.lists(_dims, min_size=0, max_size=5)))
        size = math.prod(max(d, 0) for d in shape) * (4 if dtype == "float32" else 1) if shape else 0
        if size > 1 << 16 or draw(st.integers(0, 4)) == 0:
            size = draw(st.integers(0, 64))  # a frame that disagrees with its header
        frame = draw(st.integers(-1, count) if draw(st.integers(0, 9)) == 0 else st.just(index))
        refs.append(ArrayRef(frame, dtype, shape))
        frames.append(bytes(draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))).ljust(size, b"\x7f"))
    if draw(st.integers(0, 9)) == 0:
        frames.append(b"stray")
    return refs, frames


@st.composite
def encodes(draw) -> list:
    kinds = draw(st.lists(st.sampled_from(["image", "video", "patches"]), min_size=0, max_size=3))
    refs, frames = draw(array_frames(len(kinds)))
    items = []
    for kind, ref in zip(kinds, refs):
        if kind == "patches":
            grid = tuple(draw(st.lists(st.integers(-2, 8), min_size=3, max_size=3)))
            items.append(PatchItem(ref, grid))
        else:
            items.append(ImageItem(ref) if kind == "image" else VideoItem(ref))
    deadline = draw(st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 5000))
    message = Encode(draw(_ids), items, deadline, draw(_ids), draw(st.booleans()))
    return client_codec().encode(message, frames)


@st.composite
def plausible_encodes(draw) -> list:
    """Requests a real client could send: right dtypes and consistent frames, odd sizes and values."""
    items, frames = [], []
    for index in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["image", "video", "patches"]))
        if kind == "patches":
            grid = (draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2)))
            if draw(st.integers(0, 3)) == 0:
                grid = (grid[0], grid[1] + 1, grid[2])  # disagrees with the rows sent
            tokens = grid[0] * (grid[1] // 2 * 2) * grid[2]
            values = np.full((tokens, PATCH_DIM), draw(st.floats(-2, 2) | st.sampled_from([np.nan, np.inf])),
                             np.float32)
            items.append(PatchItem(array_ref(values, index), grid))
            frames.append(values)
        else:
            shape = tuple(draw(st.lists(st.integers(0, 48), min_size=2, max_size=2)))
            shape = ((draw(st.integers(0, 5)),) if kind == "video" else ()) + shape + (3,)
            pixels = np.full(shape, draw(st.integers(0, 255)), np.uint8)
            items.append((VideoItem if kind == "video" else ImageItem)(array_ref(pixels, index)))
            frames.append(pixels)
    deadline = draw(st.none() | st.floats(0, 5000) | st.sampled_from([-1.0, np.nan, np.inf, 1e12]))
    message = Encode(draw(st.integers(0, 50)), items, deadline, draw(st.integers(-5, 5)))
    return client_codec().encode(message, frames)


_controls = st.one_of(
    st.builds(Hello, st.just(PROTOCOL_VERSION) | st.integers(-3, 2**40), st.text(max_size=8)),
    st.builds(Cancel, _ids),
    st.builds(Release, st.lists(_ids, max_size=4)),
    st.just(StatsQuery()),
    st.just(HealthQuery()),
).map(lambda message: client_codec().encode(message))

messages = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    maps_or_lists().map(lambda value: [msgspec.msgpack.encode(value)]),
    _controls,
    encodes(),
    plausible_encodes(),
)


class Peer(RawPeer):
    def __init__(self, endpoint: str):
        super().__init__(endpoint)
        self.replies = 0

    def exchange(self, frames: list) -> None:
        """Send, then a stats query as a barrier; check every reply; release any result at once."""
        self.socket.send_multipart(frames, copy=False)
        self.socket.send_multipart(self.codec.encode(StatsQuery()))
        while True:
            message, _ = self.receive()  # raises if not a valid server message
            self.replies += 1
            match message:
                case Stats():
                    return
                case Error(code=code, message=text):
                    assert code in CODES and text
                case Result(id=request_id):
                    self.socket.send_multipart(self.codec.encode(Release([request_id])))

    def drain(self, timeout_s: float = 60.0) -> dict:
        """Wait until no generated request is left open and every window is back (a cancelled
        request's window holds its rows until it returns), releasing results as they come."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.socket.send_multipart(self.codec.encode(StatsQuery()))
            while True:
                message, _ = self.receive()
                if isinstance(message, Result):
                    self.socket.send_multipart(self.codec.encode(Release([message.id])))
                elif isinstance(message, Stats):
                    break
            if message.values["requests_open"] == 0 and message.values["windows_in_flight"] == 0:
                return message.values
            time.sleep(0.05)
        raise AssertionError(f"requests or windows still open after {timeout_s} s: {message.values}")



def test_ten_thousand_generated_messages_then_a_valid_request(endpoint):
    peer = Peer(endpoint)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(messages)
    def one_message(frames):
        peer.exchange(frames)

    try:
        one_message()
        left = peer.drain()
    finally:
        peer.close()
    assert peer.replies >= EXAMPLES and left["slots_leased"] == 0

    pixels = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    patches = preprocess_image(pixels)
    expected = load_model("random:tiny").encode_patches(patches.pixel_values, patches.grid_thw)
    with Client(endpoint) as client:
        with client.encode([pixels]) as result:
            torch.testing.assert_close(result.items[0].embeddings, expected.embeddings, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(result.items[0].deepstack, expected.deepstack, atol=1e-5, rtol=1e-5)
