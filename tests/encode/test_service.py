"""The encode service as a real process: transports, batching, cache, limits, health."""

from __future__ import annotations

import re

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from shared.wire.images import content_hash
from tests.encode.helpers import png_bytes, png_claiming_size


def _raw_encode(service, images, timeout=30.0):
    """Encode through protoc's generated stub (the chunks parsed by protobuf itself)."""
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.EncodeServiceStub(channel)
        return list(stub.Encode(pb.EncodeRequest(images=images), timeout=timeout))


def _raw_tensor(service, data: bytes) -> tuple[pb.ImageHeader, torch.Tensor]:
    """One image encoded inline; its tensor reassembled from the generated classes' chunks."""
    messages = _raw_encode(service, [pb.ImageInput(data=data)])
    header = messages[0].header
    raw = b"".join(m.chunk.data for m in messages[1:])
    return header, torch.frombuffer(bytearray(raw), dtype=torch.float32).view(*header.shape)


def test_health_info_and_reflection(encode_service):
    serving = health_pb2.HealthCheckResponse.SERVING
    assert encode_service.health() == serving
    assert encode_service.health("splitvl.encode.v1.EncodeService") == serving
    with grpc.insecure_channel(encode_service.address) as channel:
        info = pb_grpc.EncodeServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert (info.hidden_size, info.num_deepstack, info.dtype) == (64, 2, "float32")
    assert len(info.checkpoint_id) == 16
    assert (info.patch_size, info.merge_size, info.temporal_patch_size) == (16, 2, 2)
    assert (info.min_pixels, info.max_pixels, info.max_images_per_request) == (1024, 65536, 8)
    assert info.link_backend == "gloo" and info.metrics_port == encode_service.metrics_port
    assert {"splitvl.encode.v1.EncodeService", "grpc.health.v1.Health"} <= services


def _bad_requests():
    good = png_bytes(64, 64, seed=7)
    return {
        "corrupt": ([pb.ImageInput(data=b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)], "decode"),
        "empty": ([pb.ImageInput(data=b"")], "empty"),
        "bomb": ([pb.ImageInput(data=png_claiming_size(40000, 40000))], "decode limit|bomb"),
        "aspect": ([pb.ImageInput(data=png_bytes(402, 2, seed=1))], "aspect ratio"),
        "too_many": ([pb.ImageInput(data=good)] * 9, "limit is 8"),
        "no_images": ([], "no images"),
        "hash_mismatch": ([pb.ImageInput(data=good, content_hash="0" * 64)], "does not match"),
        "bad_hash": ([pb.ImageInput(content_hash="xyz")], "sha256"),
        "max_pixels": ([pb.ImageInput(data=good, max_pixels=10**9)], "over this service's limit"),
        "http_url": ([pb.ImageInput(url="http://127.0.0.1:9/x.png")], "allow-url-fetch"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_is_invalid_argument_and_service_keeps_serving(encode_service, case):
    images, message = _bad_requests()[case]
    with pytest.raises(grpc.RpcError) as err:
        _raw_encode(encode_service, images)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    header, ok = _raw_tensor(encode_service, png_bytes(64, 64, seed=8))
    assert ok.shape == (4, 192) and header.content_hash


def test_deadline_is_honoured(encode_service):
    with pytest.raises(grpc.RpcError) as err:
        _raw_encode(encode_service, [pb.ImageInput(data=png_bytes(256, 256, seed=77))], 1e-3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _header, ok = _raw_tensor(encode_service, png_bytes(64, 64, seed=78))
    assert ok.shape == (4, 192)


def test_inline_chunks_carry_the_in_process_embeddings(encode_service, reference):
    data = png_bytes(200, 120, seed=5)
    header, got = _raw_tensor(encode_service, data)
    assert header.content_hash == content_hash(data) and header.dtype == "float32"
    assert torch.equal(got, reference.encode(data))
