"""The inline tensor codec: packed embeddings as raw bytes in gRPC stream messages.

One wire contract for both transports: dtype name + shape + raw little-endian row-major bytes.
Inline, the bytes stream in `EncodeResponse.chunk` (TensorChunk) messages. The frames are
written and read here by hand, in the protobuf wire format, straight from and into the tensor's
memory: one copy per side (tensor -> frame, frame -> tensor) on top of gRPC's own, where going
through the generated classes would add two more. Headers still use the generated classes, in
each service's adapter module.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.wire.errors import WireFormatError
from shared.wire.units import DTYPES

# Protobuf tags (field_number << 3 | wire_type) of the messages framed by hand; they must match
# proto/splitvl/encode/v1/encode.proto (tests/wire/test_codec.py checks them against the generated
# code).
_CHUNK_TAG = (2 << 3) | 2  # EncodeResponse.chunk, length-delimited
_INDEX_TAG = (1 << 3) | 0  # TensorChunk.index, varint
_OFFSET_TAG = (2 << 3) | 0  # TensorChunk.offset, varint
_DATA_TAG = (3 << 3) | 2  # TensorChunk.data, length-delimited
_PADDING_TAG = (4 << 3) | 2  # TensorChunk.padding, length-delimited
# Chunk data starts at a multiple of this within its frame; CPython's bytes payloads are 16-byte
# aligned, so a reader can view the data in place as a tensor of any supported dtype.
DATA_ALIGNMENT = 16


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of a header's dtype name ('float32', 'bfloat16', 'float16')."""
    if name not in DTYPES:
        raise WireFormatError(f"unsupported tensor dtype {name!r}; expected one of {list(DTYPES)}")
    return DTYPES[name]


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError(
            "the tensor wire format is little-endian; big-endian hosts are unsupported"
        )


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor's data (copied to CPU / made contiguous if needed)."""
    _require_little_endian()
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    flat = tensor.contiguous().view(-1)
    # numpy keeps a reference to the tensor, so the view stays valid after the caller drops it.
    return memoryview(flat.view(torch.uint8).numpy())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireFormatError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def iter_chunk_frames(index: int, data: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """Serialized `EncodeResponse{chunk: TensorChunk{index, offset, padding, data}}` frames.

    Building each frame copies its slice of data once; that bytes object is what gRPC sends.
    """
    for offset in range(0, len(data), chunk_bytes):
        piece = data[offset : offset + chunk_bytes]
        yield b"".join((_chunk_head(index, offset, len(piece)), piece))


def _chunk_head(index: int, offset: int, size: int) -> bytes:
    """Frame bytes before the data, padded to a multiple of DATA_ALIGNMENT."""
    fields = b"".join((bytes([_INDEX_TAG]), _varint(index), bytes([_OFFSET_TAG]), _varint(offset)))
    data_head = b"".join((bytes([_DATA_TAG]), _varint(size)))
    for pad in range(2 * DATA_ALIGNMENT):
        padding = b"".join((bytes([_PADDING_TAG]), _varint(pad), bytes(pad)))
        inner = b"".join((fields, padding, data_head))
        head = b"".join((bytes([_CHUNK_TAG]), _varint(len(inner) + size), inner))
        if len(head) % DATA_ALIGNMENT == 0:
            return head
    raise AssertionError("unreachable: some padding length aligns the data")


@dataclass(frozen=True)
class ChunkView:
    """A parsed TensorChunk whose data is a view into the received frame (no copy)."""

    index: int
    offset: int
    data: memoryview


def parse_chunk_frame(frame: bytes) -> ChunkView | None:
    """Parse a serialized EncodeResponse holding only a chunk; None for anything else (headers)."""
    buf = memoryview(frame)
    if len(buf) == 0 or buf[0] != _CHUNK_TAG:
        return None
    length, pos = _read_varint(buf, 1)
    if pos + length != len(buf):
        return None  # more fields than a lone chunk: let the generated parser handle it
    index = offset = 0
    data = buf[pos:pos]
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if field == 1:
                index = value
            elif field == 2:
                offset = value
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireFormatError("truncated chunk data")
            if field == 3:
                data = buf[pos : pos + size]
            pos += size
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} in a tensor chunk")
    return ChunkView(index, offset, data)


class TensorAssembler:
    """Collects one tensor's chunks, in order.

    A tensor that arrives as one aligned chunk becomes a view of the received message: no copy, and
    the result must be treated as read-only (its memory is an immutable bytes object). Otherwise
    the chunks are copied into memory allocated on the first one.
    """

    def __init__(
        self, dtype: torch.dtype, shape: Sequence[int], num_bytes: int, pin_memory: bool = False
    ):
        _require_little_endian()
        self.pin_memory = pin_memory
        self.element_size = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * self.element_size
        if num_bytes != expected:
            raise WireFormatError(
                f"header says {num_bytes} bytes but shape {tuple(shape)} of {dtype} needs "
                f"{expected}"
            )
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.num_bytes = num_bytes
        self.received = 0
        self._bytes: torch.Tensor | None = None  # uint8 [num_bytes]
        self._copied = False

    @property
    def complete(self) -> bool:
        return self.received == self.num_bytes

    @property
    def zero_copy(self) -> bool:
        """Whether the result views the received message."""
        return self._bytes is not None and not self._copied

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if offset != self.received:
            raise WireFormatError(f"chunk at byte {offset}, expected {self.received}: out of order")
        end = offset + len(data)
        if end > self.num_bytes:
            raise WireFormatError(f"chunk ends at byte {end}, past the tensor's {self.num_bytes}")
        array = np.frombuffer(data, dtype=np.uint8)
        if end == self.num_bytes and offset == 0 and array.ctypes.data % self.element_size == 0:
            with warnings.catch_warnings():  # read-only by contract, see the class docstring
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._bytes = torch.from_numpy(array)
        else:
            if self._bytes is None:
                self._bytes = torch.empty(
                    self.num_bytes, dtype=torch.uint8, pin_memory=self.pin_memory
                )
                self._copied = True
            self._bytes.numpy()[offset:end] = array
        self.received = end

    def result(self) -> torch.Tensor:
        if not self.complete:
            raise WireFormatError(f"received {self.received} of {self.num_bytes} tensor bytes")
        data = self._bytes if self._bytes is not None else torch.empty(0, dtype=torch.uint8)
        return data.view(self.dtype).view(self.shape)
