"""Framing: a message becomes [msgpack header, *array frames] and back, with every array
reference checked against the frames that actually arrived.

One `Codec` per socket side: msgspec encoders and typed decoders are reusable and much
faster than building one per message, and a typed decoder rejects anything outside the
union before our code sees it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import msgspec
import numpy as np

from .messages import ArrayRef, ClientMessage, ErrorCode, ServerMessage
from .slabs import numpy_dtype

WIRE_DTYPES = ("uint8", "float32", "float16", "bfloat16")
MAX_RANK = 4


class ProtocolError(Exception):
    """A message we cannot accept; `code` and `request_id` go into the error reply."""

    def __init__(self, message: str, code: ErrorCode = "protocol", request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class Codec:
    def __init__(self, accepts: Any):
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(accepts)

    def encode(self, message: msgspec.Struct, arrays: Iterable[Any] = ()) -> list[Any]:
        """Frames to send: the header, then each array's buffer as is (no copy)."""
        return [self._encoder.encode(message), *arrays]

    def decode(self, frames: Sequence[Any]) -> tuple[Any, list[memoryview]]:
        """(message, array frames). Raises ProtocolError for anything that is not one of our messages."""
        if not frames:
            raise ProtocolError("empty message: expected a msgpack header frame")
        try:
            message = self._decoder.decode(memoryview(frames[0]))
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise ProtocolError(f"undecodable message: {err}") from None
        except RecursionError:  # msgspec skipping a deeply nested unknown field
            raise ProtocolError("undecodable message: nested too deeply") from None
        return message, [memoryview(frame) for frame in frames[1:]]


def client_codec() -> Codec:
    """The client's side: sends client messages, decodes server messages."""
    return Codec(ServerMessage)


def server_codec() -> Codec:
    return Codec(ClientMessage)


_DTYPE_NAMES = {np.dtype(name): name for name in WIRE_DTYPES if name != "bfloat16"}


def array_ref(array: np.ndarray, frame: int, dtype: str | None = None, offset: int = -1) -> ArrayRef:
    """A reference to `array` sent as frame `frame`, or (frame -1) written at `offset` of the input arena."""
    name = dtype or _DTYPE_NAMES.get(array.dtype) or array.dtype.name  # dtype.name is slow
    return ArrayRef(frame=frame, dtype=name, shape=array.shape, offset=offset)


def check_ref(ref: ArrayRef, request_id: int | None = None) -> None:
    """ProtocolError unless the reference's dtype and shape are ones the wire carries."""
    where = f"frame {ref.frame}" if ref.offset < 0 else f"arena offset {ref.offset}"
    if ref.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"array in {where}: dtype {ref.dtype!r} is not one of {list(WIRE_DTYPES)}",
                            "invalid_input", request_id)
    if not 1 <= len(ref.shape) <= MAX_RANK or any(d < 0 for d in ref.shape):
        raise ProtocolError(f"array in {where}: shape {list(ref.shape)} must have 1 to {MAX_RANK} non-negative "
                            f"dimensions", "invalid_input", request_id)


def frame_array(ref: ArrayRef, frames: Sequence[memoryview], request_id: int | None = None) -> np.ndarray:
    """The read-only array a reference describes, after checking it against the frames."""
    def fail(problem: str) -> ProtocolError:
        return ProtocolError(f"array in frame {ref.frame}: {problem}", "invalid_input", request_id)

    if not 0 <= ref.frame < len(frames):
        raise fail(f"no such frame (the message has {len(frames)} array frames)")
    check_ref(ref, request_id)
    dtype = numpy_dtype(ref.dtype)
    expected = math.prod(ref.shape) * dtype.itemsize  # Python ints: a hostile shape cannot wrap around
    buffer = frames[ref.frame]
    if buffer.nbytes != expected:
        raise fail(f"{buffer.nbytes} bytes, but shape {list(ref.shape)} of {ref.dtype} needs {expected}")
    array = np.frombuffer(buffer, dtype=dtype).reshape(ref.shape)
    array.flags.writeable = False  # received frames are writable memory; inputs are not ours to change
    return array


def check_all_frames_used(refs: Iterable[ArrayRef], frames: Sequence[memoryview], request_id: int | None) -> None:
    """Every frame is referenced exactly once: a stray or shared frame means a confused client."""
    used = sorted(ref.frame for ref in refs)
    if used != list(range(len(frames))):
        raise ProtocolError(
            f"the header references frames {used}, but {len(frames)} array frames arrived "
            f"(each must be referenced exactly once)", "invalid_input", request_id,
        )
