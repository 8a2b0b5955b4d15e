"""Wire codec against the generated protobuf classes, and P2PLink between two ranks over gloo."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch

from proto.splitvl.encode.v1 import encode_pb2 as pb
from shared.wire.codec import (
    DATA_ALIGNMENT,
    TensorAssembler,
    iter_chunk_frames,
    parse_chunk_frame,
    tensor_bytes,
)
from shared.wire.errors import LinkError, WireFormatError
from shared.wire.link import P2PLink, connect_store, new_link_secret, start_store_server


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunk_frames_parse_as_protobuf_and_reassemble(dtype):
    tensor = torch.randn(37, 24).to(dtype)
    data = tensor_bytes(tensor)
    frames = list(iter_chunk_frames(3, data, chunk_bytes=256))
    assert len(frames) == -(-len(data) // 256)
    mine = TensorAssembler(dtype, tensor.shape, len(data))
    theirs = TensorAssembler(dtype, tensor.shape, len(data))
    for frame in frames:
        generated = pb.EncodeResponse.FromString(frame)  # the frames are valid protobuf
        assert generated.WhichOneof("payload") == "chunk" and generated.chunk.index == 3
        view = parse_chunk_frame(frame)
        assert (view.index, view.offset) == (generated.chunk.index, generated.chunk.offset)
        assert bytes(view.data) == generated.chunk.data
        mine.write(view.offset, view.data)
        theirs.write(generated.chunk.offset, generated.chunk.data)
    assert torch.equal(mine.result(), tensor) and torch.equal(theirs.result(), tensor)
    assert not mine.zero_copy


@pytest.mark.parametrize("index", [0, 5, 300])
def test_single_chunk_is_used_in_place(index):
    tensor = torch.randn(1000, 24).to(torch.bfloat16)
    data = tensor_bytes(tensor)
    [frame] = list(iter_chunk_frames(index, data, chunk_bytes=len(data)))
    view = parse_chunk_frame(frame)
    assert (len(frame) - len(view.data)) % DATA_ALIGNMENT == 0  # padded so the data is aligned
    assert pb.EncodeResponse.FromString(frame).chunk.data == bytes(data)
    asm = TensorAssembler(torch.bfloat16, tensor.shape, len(data))
    asm.write(view.offset, view.data)
    out = asm.result()
    assert asm.zero_copy and torch.equal(out, tensor)
    frame_start = np.frombuffer(frame, dtype=np.uint8).ctypes.data
    assert frame_start <= out.data_ptr() < frame_start + len(frame)  # a view of the message


def test_parser_reads_frames_serialized_by_protobuf():
    frame = pb.EncodeResponse(chunk=pb.TensorChunk(index=0, offset=0, data=b"abc"))
    view = parse_chunk_frame(frame.SerializeToString())  # zero fields omitted on the wire
    assert (view.index, view.offset, bytes(view.data)) == (0, 0, b"abc")
    header = pb.EncodeResponse(header=pb.ImageHeader(index=1, dtype="float32"))
    assert parse_chunk_frame(header.SerializeToString()) is None


def test_assembler_rejects_bad_streams():
    with pytest.raises(WireFormatError, match="needs"):
        TensorAssembler(torch.float32, (2, 3), 20)
    asm = TensorAssembler(torch.float32, (2, 3), 24)
    with pytest.raises(WireFormatError, match="out of order"):
        asm.write(8, b"\0" * 8)
    asm.write(0, b"\0" * 16)
    with pytest.raises(WireFormatError, match="past"):
        asm.write(16, b"\0" * 16)
    with pytest.raises(WireFormatError, match="received 16 of 24"):
        asm.result()


def _pair(store, link_id: str, timeout_s: float = 10.0) -> tuple[P2PLink, P2PLink]:
    """Both ranks of a link, built concurrently as two processes would."""
    peer: dict[str, P2PLink] = {}
    secret = new_link_secret()
    client_store = connect_store("127.0.0.1", store.port, timeout_s)

    def join():
        peer["link"] = P2PLink(link_id, client_store, 1, "cpu", timeout_s, secret=secret)

    thread = threading.Thread(target=join)
    thread.start()
    server = P2PLink(link_id, store, 0, "cpu", timeout_s, secret=secret)
    thread.join(timeout_s)
    return server, peer["link"]


def _transfer(sender: P2PLink, receiver: P2PLink, tensors, tags):
    received = {}
    specs = [(t.shape, t.dtype) for t in tensors]
    thread = threading.Thread(target=lambda: received.update(out=receiver.recv(specs, tags)))
    thread.start()
    sender.send(tensors, tags)
    thread.join(30)
    return received["out"]


def test_link_moves_tensors_bit_exactly_in_order():
    store = start_store_server("127.0.0.1", 10)
    server, client = _pair(store, uuid.uuid4().hex)
    tensors = [torch.randn(5, 12), torch.randn(3, 8).to(torch.bfloat16), torch.randn(0, 4)]
    out = _transfer(server, client, tensors, [1, 2, 3])
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(tensors, out, strict=True))
    server.close()
    client.close()


def test_broken_link_fails_clearly_and_others_are_unaffected():
    store = start_store_server("127.0.0.1", 10)
    a_server, a_client = _pair(store, "a" + uuid.uuid4().hex, timeout_s=3)
    b_server, b_client = _pair(store, "b" + uuid.uuid4().hex, timeout_s=3)
    a_server.close("simulated crash")
    with pytest.raises(LinkError, match="broke during recv"):
        a_client.recv([((4,), torch.float32)], [7])
    assert a_client.broken
    with pytest.raises(LinkError, match="unusable"):
        a_client.recv([((4,), torch.float32)], [8])
    x = torch.arange(6.0)
    assert torch.equal(_transfer(b_server, b_client, [x], [9])[0], x)
    # A new link replaces the broken one.
    c_server, c_client = _pair(store, "c" + uuid.uuid4().hex)
    assert torch.equal(_transfer(c_server, c_client, [x], [1])[0], x)
    for link in (a_client, b_server, b_client, c_server, c_client):
        link.close()
