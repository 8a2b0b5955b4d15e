"""The language service's encode client against real encode service processes: both transports,
batching and cache seen through it, typed errors, broken links, fail-over, the handshake."""

from __future__ import annotations

import asyncio
import base64
import signal
import time

import grpc
import httpx
import pytest
import torch

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from services.language.encoder.client import EncodeClient, EncodeClientConfig, EncodeError
from services.language.encoder.rpc import ErrorKind
from shared.wire.images import ImageRef, content_hash
from tests.encode.helpers import EncodeProcess, metric_value, png_bytes

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
    return httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_delivered_embeddings_are_bit_identical_to_in_process(encode_service, reference, transport):
    data = png_bytes(200, 120, seed=hash(transport) % 1000)
    expected = reference.encode(data)
    [got] = _encode(encode_service, [ImageRef(data)], transport)
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
            calls = [client.encode([ImageRef(d) for d in imgs]) for imgs in requests]
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
    [first] = _encode(encode_service, [ImageRef(data)])
    [second] = _encode(encode_service, [ImageRef(data)])
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.packed, second.packed)
    hits = metric_value(_metrics(encode_service), "splitvl_encode_cache_hits_total")
    assert hits == metric_value(before, "splitvl_encode_cache_hits_total") + 1
    scraped = httpx.get(f"http://127.0.0.1:{encode_service.metrics_port}/metrics", timeout=5).text
    assert metric_value(scraped, "splitvl_encode_cache_hits_total") == hits
    # The same image named by a data: URL or by its hash alone is the same cache entry.
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    [by_url] = _encode(encode_service, [ImageRef(url=url)])
    [by_hash] = _encode(encode_service, [ImageRef(content_hash=content_hash(data))])
    assert by_url.cache_hit and by_hash.cache_hit
    assert torch.equal(by_url.packed, first.packed) and torch.equal(by_hash.packed, first.packed)


def test_client_surfaces_typed_errors(encode_service):
    with pytest.raises(EncodeError) as err:
        _encode(encode_service, [ImageRef(b"not an image")])
    assert err.value.kind is ErrorKind.INVALID and "image 0" in str(err.value)
    with pytest.raises(EncodeError) as err:
        _encode(encode_service, [ImageRef(content_hash="ab" * 32)])
    assert err.value.kind is ErrorKind.NOT_FOUND


def test_per_request_max_pixels(encode_service, reference):
    data = png_bytes(256, 256, seed=99)
    [small] = _encode(encode_service, [ImageRef(data, max_pixels=64 * 64)])
    assert small.grid_thw == (1, 4, 4)
    assert torch.equal(small.packed, reference.encode(data, max_pixels=64 * 64))


def test_a_broken_link_is_retried_inline_or_fails_clearly_and_is_set_up_again(
    encode_service, reference
):
    images = [png_bytes(80, 80, seed=900 + i) for i in range(3)]

    def close_link_on_service(link_id):
        with grpc.insecure_channel(encode_service.address) as channel:
            stub = pb_grpc.EncodeServiceStub(channel)
            stub.CloseLink(pb.CloseLinkRequest(link_id=link_id), timeout=5)

    async def run(max_attempts):
        config = EncodeClientConfig((encode_service.address,), "nccl", max_attempts=max_attempts)
        client = EncodeClient(config)
        try:
            await client.encode([ImageRef(images[0])])
            first_link = client.link_id(encode_service.address)
            close_link_on_service(first_link)
            try:
                second = await client.encode([ImageRef(images[1])])
            except EncodeError as exc:
                second = exc
            third = await client.encode([ImageRef(images[2])])
            last_link = client.link_id(encode_service.address)
            return first_link, second, third, last_link, (client.retries, client.link_fallbacks)
        finally:
            await client.close()

    # One attempt: the request on the broken link fails with a clear error; the next one works.
    first_link, second, third, last_link, (retries, _) = asyncio.run(run(max_attempts=1))
    assert isinstance(second, EncodeError) and "link" in str(second)
    assert last_link not in (None, first_link) and retries == 0
    assert torch.equal(third[0].packed, reference.encode(images[2]))
    # With retries the same break is invisible to the caller: the image is retried inline over
    # gRPC, and the next request sets up a new link.
    first_link, second, third, last_link, (retries, fallbacks) = asyncio.run(run(max_attempts=3))
    assert retries == 1 and fallbacks == 1 and last_link != first_link
    assert torch.equal(second[0].packed, reference.encode(images[1]))


@pytest.mark.parametrize("transport", ["grpc", "nccl"])
def test_killing_a_replica_mid_flight_loses_no_request(tiny_vl_dir, tmp_path, reference, transport):
    replica_a = EncodeProcess(tiny_vl_dir, tmp_path, name="a").start()
    replica_b = EncodeProcess(tiny_vl_dir, tmp_path, name="b").start()
    images = [png_bytes(96 + 16 * (i % 4), 64, seed=700 + i) for i in range(16)]

    async def run():
        config = EncodeClientConfig((replica_a.address, replica_b.address), transport, timeout_s=60)
        client = EncodeClient(config)
        try:
            # One request's images are spread over both replicas (links set up on both).
            warm = await client.encode(
                [ImageRef(png_bytes(64, 64, seed=600 + i)) for i in range(4)]
            )
            assert {w.source for w in warm} == {replica_a.address, replica_b.address}
            replica_a.signal(signal.SIGSTOP)  # calls routed to A now hang there
            tasks = [asyncio.ensure_future(client.encode([ImageRef(d)])) for d in images]
            deadline = time.monotonic() + 10
            while client.outstanding(replica_a.address) == 0:
                assert time.monotonic() < deadline, "no call reached replica A"
                await asyncio.sleep(0.01)
            stuck_on_a = client.outstanding(replica_a.address)
            replica_a.kill()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return results, stuck_on_a, client.retries
        finally:
            await client.close()

    try:
        replica_a.wait_serving()
        replica_b.wait_serving()
        results, stuck_on_a, retries = asyncio.run(run())
    finally:
        replica_a.kill()
        replica_b.stop()
    assert stuck_on_a >= 1 and retries >= stuck_on_a
    for data, [got] in zip(images, results, strict=True):
        assert got.source == replica_b.address
        torch.testing.assert_close(got.packed, reference.encode(data), rtol=0, atol=1e-5)
