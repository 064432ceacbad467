"""Bad input through a live `vitserve serve`: every malformed or hostile message is answered
with an error that has a code and says what was wrong, the connection stays usable, and other
clients are unaffected. Messages are hand-made frames on a raw ZeroMQ socket, as a buggy or
hostile client would send them."""

from __future__ import annotations


import msgspec
import numpy as np
import pytest
from served import RawPeer, served

from vitserve import Client
from vitserve.ipc.codec import array_ref
from vitserve.ipc.messages import (PROTOCOL_VERSION, ArrayRef, Encode, Error, Hello, ImageItem, PatchItem, Release,
                                   Result, VideoItem)

MAX_REQUEST_BYTES = 1 << 20
PATCH_DIM = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('sock')}/bad-input.sock"
    with served(endpoint, "--min-budget", "64", "--max-budget", "2048", "--max-request-bytes", str(MAX_REQUEST_BYTES)):
        yield endpoint


@pytest.fixture
def peer(endpoint):
    peer = RawPeer(endpoint)
    assert type(peer.ask(peer.codec.encode(Hello(PROTOCOL_VERSION)))[0][0]).__name__ == "Welcome"
    yield peer
    peer.close()


def image(height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def one_error(replies: list, request_id: int | None, code: str, *words: str) -> Error:
    assert len(replies) == 1, replies
    message = replies[0][0]
    assert isinstance(message, Error), message
    assert (message.id, message.code) == (request_id, code), message
    for word in words:
        assert word in message.message, message.message
    return message


def still_serves(peer: RawPeer, request_id: int = 999) -> None:
    """A valid request on the same connection gets its result (and is released)."""
    pixels = image()
    replies = peer.encode(request_id, [ImageItem(array_ref(pixels, 0))], [pixels])
    assert len(replies) == 1 and isinstance(replies[0][0], Result), replies
    assert peer.ask(peer.codec.encode(Release([request_id]))) == []


# -- messages that cannot be read: answered with `protocol`, id unknown ---------------------------

@pytest.mark.parametrize("frames, words", [
    ([b"\xc1\xff\x00"], ["undecodable"]),
    ([msgspec.msgpack.encode({"type": "launch", "id": 1})], ["launch"]),
    ([msgspec.msgpack.encode([1, 2, 3])], []),
    ([b""], []),
])
def test_unreadable_messages_are_answered_with_protocol(peer, frames, words):
    one_error(peer.ask(frames), None, "protocol", *words)
    still_serves(peer)


def test_wrong_protocol_version_is_refused_and_the_connection_can_try_again(peer):
    one_error(peer.ask(peer.codec.encode(Hello(PROTOCOL_VERSION + 7))), None, "protocol", "version")
    replies = peer.ask(peer.codec.encode(Hello(PROTOCOL_VERSION)))
    assert type(replies[0][0]).__name__ == "Welcome"
    still_serves(peer)


# -- frames that disagree with the header: `invalid_input` with the request's id -------------------

def test_missing_frame(peer):
    pixels = image()
    one_error(peer.encode(1, [ImageItem(array_ref(pixels, 0))], []), 1, "invalid_input", "frame")
    still_serves(peer)


def test_extra_frame(peer):
    pixels = image()
    one_error(peer.encode(2, [ImageItem(array_ref(pixels, 0))], [pixels, pixels]), 2, "invalid_input", "frames")
    still_serves(peer)


def test_frame_size_disagrees_with_the_header(peer):
    pixels = image()
    ref = ArrayRef(0, "uint8", (64, 64, 3))  # the frame holds 32x32x3
    one_error(peer.encode(3, [ImageItem(ref)], [pixels]), 3, "invalid_input", "bytes")
    still_serves(peer)


@pytest.mark.parametrize("array, word", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),  # wrong dtype
    (np.zeros((32, 32), np.uint8), "uint8"),  # wrong rank
    (np.zeros((32, 32, 3, 1), np.uint8), "uint8"),
])
def test_image_of_wrong_dtype_or_rank(peer, array, word):
    one_error(peer.encode(4, [ImageItem(array_ref(array, 0))], [array]), 4, "invalid_input", word)
    still_serves(peer)


# -- pixels the preprocessor cannot take -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 32, 3), (32, 0, 3), (0, 0, 3)])
def test_zero_sized_image(peer, shape):
    array = np.zeros(shape, np.uint8)
    one_error(peer.encode(5, [ImageItem(array_ref(array, 0))], [array]), 5, "invalid_input")
    still_serves(peer)


def test_one_pixel_image_is_answered_like_the_reference_processor_does(peer):
    """Hugging Face's processor scales a 1x1 image up to its minimum pixel count; so do we."""
    array = image(1, 1)
    replies = peer.encode(6, [ImageItem(array_ref(array, 0))], [array])
    assert isinstance(replies[0][0], Result) and replies[0][0].outputs[0].shape[0] == 64  # 16x16 patches / 4
    assert peer.ask(peer.codec.encode(Release([6]))) == []


def test_aspect_ratio_over_200(peer):
    array = np.zeros((2, 402, 3), np.uint8)
    one_error(peer.encode(7, [ImageItem(array_ref(array, 0))], [array]), 7, "invalid_input", "aspect ratio")
    still_serves(peer)


def test_image_over_the_byte_limit(peer):
    array = np.zeros((1024, 512, 3), np.uint8)  # 1.5 MiB of pixels, well within the pixel limit
    one_error(peer.encode(8, [ImageItem(array_ref(array, 0))], [array]), 8, "too_large", "max_request_bytes")
    still_serves(peer)


def test_frame_over_the_byte_limit_disconnects_only_its_sender(endpoint):
    """A frame larger than any admissible request is not read at all (ZeroMQ's MAXMSGSIZE): the
    sender is dropped, the server and its other clients go on."""
    hostile = RawPeer(endpoint)
    array = np.zeros((4 * MAX_REQUEST_BYTES // 3, 3), np.uint8)
    hostile.socket.send_multipart(hostile.codec.encode(Encode(1, [ImageItem(array_ref(array, 0))]), [array]))
    try:
        assert hostile.socket.poll(2000) == 0, "the frame was read and answered"
    finally:
        hostile.close()
    bystander = RawPeer(endpoint)
    try:
        still_serves(bystander)
    finally:
        bystander.close()


def test_video_over_the_frame_limit(peer):
    array = np.zeros((770, 16, 16, 3), np.uint8)  # the default limit is 768 frames
    one_error(peer.encode(9, [VideoItem(array_ref(array, 0))], [array]), 9, "invalid_input", "768")
    still_serves(peer)


# -- processed patches ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_patches_that_are_not_finite(peer, bad):
    values = np.zeros((16, PATCH_DIM), np.float32)
    values[3, 7] = bad
    one_error(peer.encode(10, [PatchItem(array_ref(values, 0), (1, 4, 4))], [values]), 10, "invalid_input", "NaN or Inf")
    still_serves(peer)


@pytest.mark.parametrize("grid", [(1, 4, 8), (1, 3, 4), (0, 4, 4), (1, -4, -4)])
def test_grid_inconsistent_with_the_patches(peer, grid):
    values = np.zeros((16, PATCH_DIM), np.float32)
    one_error(peer.encode(11, [PatchItem(array_ref(values, 0), grid)], [values]), 11, "invalid_input")
    still_serves(peer)


# -- request fields ---------------------------------------------------------------------------------

@pytest.mark.parametrize("deadline_ms", [-1.0, float("nan"), float("inf"), 1e300, 86_400_001.0])
def test_negative_or_absurd_deadline(peer, deadline_ms):
    pixels = image()
    replies = peer.encode(12, [ImageItem(array_ref(pixels, 0))], [pixels], deadline_ms=deadline_ms)
    one_error(replies, 12, "invalid_input", "deadline_ms")
    still_serves(peer)


def test_duplicate_request_id_while_the_first_is_held(peer):
    pixels = image()
    first = peer.encode(13, [ImageItem(array_ref(pixels, 0))], [pixels])
    assert isinstance(first[0][0], Result)
    one_error(peer.encode(13, [ImageItem(array_ref(pixels, 0))], [pixels]), 13, "invalid_input", "already in use")
    assert peer.ask(peer.codec.encode(Release([13]))) == []  # the first is still held, and released now
    still_serves(peer)


def test_release_of_a_request_that_is_not_yours_or_is_gone(peer, endpoint):
    pixels = image()
    assert isinstance(peer.encode(14, [ImageItem(array_ref(pixels, 0))], [pixels])[0][0], Result)
    other = RawPeer(endpoint)
    try:  # the same id from another connection is not the same request
        one_error(other.ask(other.codec.encode(Release([14]))), 14, "invalid_input", "holds nothing")
    finally:
        other.close()
    assert peer.ask(peer.codec.encode(Release([14]))) == []  # still ours, released once
    one_error(peer.ask(peer.codec.encode(Release([14]))), 14, "invalid_input", "already released")
    one_error(peer.ask(peer.codec.encode(Release([4242]))), 4242, "invalid_input", "never")
    still_serves(peer)


def test_a_well_behaved_client_is_unaffected_by_a_hostile_neighbour(endpoint, peer):
    with Client(endpoint) as client:
        for frames in ([b"\xc1"], [msgspec.msgpack.encode({"type": "encode", "id": "x"})]):
            one_error(peer.ask(frames), None, "protocol")
            with client.encode([image()]) as result:
                assert result.items[0].embeddings.shape[0] == 64  # 32x32 is scaled up to 16x16 patches
