"""The encode service as a real process: transports, batching, cache, limits, health."""

from __future__ import annotations

import asyncio
import base64
import re

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from services.encode.sources import content_hash
from services.language.encode_client import (
    EncodeClient,
    EncodeClientConfig,
    EncodeError,
    ImageInput,
)
from tests.encode.helpers import metric_value, png_bytes, png_claiming_size

TRANSPORTS = ["grpc", "nccl"]  # nccl selects a gloo link on CPU
SIZES = [(64, 48), (200, 100), (32, 32), (256, 256), (100, 300), (90, 60), (48, 160), (300, 20)]


def _encode(service, images, transport="grpc", **kw):
    async def run():
        client = EncodeClient(EncodeClientConfig((service.address,), transport=transport, **kw))
        try:
            return await client.encode(images)
        finally:
            await client.close()

    return asyncio.run(run())


def _raw_encode(service, images, timeout=30.0):
    """Encode through protoc's generated stub (the chunks parsed by protobuf itself)."""
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.EncodeServiceStub(channel)
        return list(stub.Encode(pb.EncodeRequest(images=images), timeout=timeout))


def _metrics(service) -> str:
    with grpc.insecure_channel(service.address) as channel:
        return pb_grpc.EncodeServiceStub(channel).GetMetrics(pb.GetMetricsRequest(), timeout=5).text


def test_health_info_and_reflection(encode_service):
    serving = health_pb2.HealthCheckResponse.SERVING
    assert encode_service.health() == serving
    assert encode_service.health("splitvl.encode.v1.EncodeService") == serving
    with grpc.insecure_channel(encode_service.address) as channel:
        info = pb_grpc.EncodeServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert (info.hidden_size, info.num_deepstack, info.dtype) == (64, 2, "float32")
    assert (info.patch_size, info.merge_size, info.temporal_patch_size) == (16, 2, 2)
    assert (info.min_pixels, info.max_pixels, info.max_images_per_request) == (1024, 65536, 8)
    assert info.link_backend == "gloo" and info.metrics_port == encode_service.metrics_port
    assert {"splitvl.encode.v1.EncodeService", "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_delivered_embeddings_are_bit_identical_to_in_process(encode_service, reference, transport):
    data = png_bytes(200, 120, seed=hash(transport) % 1000)
    expected = reference.encode(data)
    [got] = _encode(encode_service, [ImageInput(data)], transport)
    assert got.packed.dtype == torch.float32 and got.packed.shape == expected.shape
    assert torch.equal(got.packed, expected)
    assert got.content_hash == content_hash(data)
    embeds, deepstack = got.split(num_deepstack=2)
    assert embeds.shape == (expected.shape[0], 64) and deepstack.shape == (expected.shape[0], 128)
    if transport == "grpc":  # the same bytes, chunked, through the generated protobuf classes
        messages = _raw_encode(encode_service, [pb.ImageInput(data=data)])
        chunks = [m.chunk for m in messages if m.WhichOneof("payload") == "chunk"]
        assert len(chunks) > 1  # the service's 4 KiB default chunks
        raw = b"".join(c.data for c in chunks)
        header = messages[0].header
        assert tuple(header.grid_thw) == got.grid_thw and header.num_bytes == len(raw)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        assert torch.equal(flat, got.packed.view(-1))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_mixed_requests_get_their_own_embeddings(encode_service, reference, transport):
    offset = 100 * TRANSPORTS.index(transport)
    requests = [
        [png_bytes(*SIZES[(i + j) % 8], seed=offset + 10 * i + j) for j in range(1 + i % 3)]
        for i in range(18)
    ]
    before = _metrics(encode_service)

    async def run():
        config = EncodeClientConfig((encode_service.address,), transport=transport)
        client = EncodeClient(config)
        try:
            calls = [client.encode([ImageInput(d) for d in imgs]) for imgs in requests]
            return await asyncio.wait_for(asyncio.gather(*calls), 120)
        finally:
            await client.close()

    results = asyncio.run(run())
    for imgs, encoded in zip(requests, results, strict=True):
        assert len(encoded) == len(imgs)
        for data, got in zip(imgs, encoded, strict=True):
            assert got.content_hash == content_hash(data)
            torch.testing.assert_close(got.packed, reference.encode(data), rtol=0, atol=1e-5)
    after = _metrics(encode_service)
    forwards = metric_value(after, "splitvl_encode_batch_images_count") - metric_value(
        before, "splitvl_encode_batch_images_count"
    )
    batched = metric_value(after, "splitvl_encode_batch_images_sum") - metric_value(
        before, "splitvl_encode_batch_images_sum"
    )
    assert batched == sum(len(r) for r in requests)
    assert forwards < batched, "concurrent images should share vision forwards"


def test_identical_image_is_a_cache_hit_with_identical_bytes(encode_service):
    data = png_bytes(160, 96, seed=4242)
    before = _metrics(encode_service)
    [first] = _encode(encode_service, [ImageInput(data)])
    [second] = _encode(encode_service, [ImageInput(data)])
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.packed, second.packed)
    hits = metric_value(_metrics(encode_service), "splitvl_encode_cache_hits_total")
    assert hits == metric_value(before, "splitvl_encode_cache_hits_total") + 1
    scraped = httpx.get(f"http://127.0.0.1:{encode_service.metrics_port}/metrics", timeout=5).text
    assert metric_value(scraped, "splitvl_encode_cache_hits_total") == hits
    # The same image named by a data: URL or by its hash alone is the same cache entry.
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    [by_url] = _encode(encode_service, [ImageInput(url=url)])
    [by_hash] = _encode(encode_service, [ImageInput(content_hash=content_hash(data))])
    assert by_url.cache_hit and by_hash.cache_hit
    assert torch.equal(by_url.packed, first.packed) and torch.equal(by_hash.packed, first.packed)


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
    [ok] = _encode(encode_service, [ImageInput(png_bytes(64, 64, seed=8))])
    assert ok.packed.shape == (4, 192)


def test_client_surfaces_typed_errors(encode_service):
    with pytest.raises(EncodeError) as err:
        _encode(encode_service, [ImageInput(b"not an image")])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in str(err.value)
    with pytest.raises(EncodeError) as err:
        _encode(encode_service, [ImageInput(content_hash="ab" * 32)])
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_deadline_is_honoured(encode_service):
    with pytest.raises(grpc.RpcError) as err:
        _raw_encode(encode_service, [pb.ImageInput(data=png_bytes(256, 256, seed=77))], 1e-3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [ok] = _encode(encode_service, [ImageInput(png_bytes(64, 64, seed=78))])
    assert ok.packed.shape == (4, 192)


def test_per_request_max_pixels(encode_service, reference):
    data = png_bytes(256, 256, seed=99)
    [small] = _encode(encode_service, [ImageInput(data, max_pixels=64 * 64)])
    assert small.grid_thw == (1, 4, 4)
    assert torch.equal(small.packed, reference.encode(data, max_pixels=64 * 64))


def test_a_broken_link_fails_its_request_clearly_and_is_set_up_again(encode_service, reference):
    images = [png_bytes(80, 80, seed=900 + i) for i in range(3)]

    def close_link_on_service(link_id):
        with grpc.insecure_channel(encode_service.address) as channel:
            stub = pb_grpc.EncodeServiceStub(channel)
            stub.CloseLink(pb.CloseLinkRequest(link_id=link_id), timeout=5)

    async def run(max_attempts):
        config = EncodeClientConfig((encode_service.address,), "nccl", max_attempts=max_attempts)
        client = EncodeClient(config)
        try:
            await client.encode([ImageInput(images[0])])
            first_link = client.link_id(encode_service.address)
            close_link_on_service(first_link)
            try:
                second = await client.encode([ImageInput(images[1])])
            except EncodeError as exc:
                second = exc
            third = await client.encode([ImageInput(images[2])])
            return first_link, second, third, client.link_id(encode_service.address), client.retries
        finally:
            await client.close()

    # One attempt: the request on the broken link fails with a clear error; the next one works.
    first_link, second, third, last_link, retries = asyncio.run(run(max_attempts=1))
    assert isinstance(second, EncodeError) and "link" in str(second)
    assert last_link not in (None, first_link) and retries == 0
    assert torch.equal(third[0].packed, reference.encode(images[2]))
    # With retries the same break is invisible to the caller.
    first_link, second, third, last_link, retries = asyncio.run(run(max_attempts=3))
    assert retries == 1 and last_link != first_link
    assert torch.equal(second[0].packed, reference.encode(images[1]))
