"""Array frames of the wire protocol: frame_array's checks, that every frame is used once, and the
Frontend's reading of a request's items from its frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wire_helpers import on_the_wire, raises_protocol

from vitserve.engine.client_requests import _items
from vitserve.ipc.codec import (
    MAX_RANK,
    WIRE_DTYPES,
    array_ref,
    check_all_frames_used,
    client_codec,
    frame_array,
    server_codec,
)
from vitserve.ipc.messages import ArrayRef, Encode, ImageItem, PatchItem, VideoItem


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
