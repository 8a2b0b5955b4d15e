"""Internal traffic security with real encode processes: the internal token, TLS and mutual TLS
(against a CA made here), and link peers that do not hold the link's secret."""

from __future__ import annotations

import asyncio
import types

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from services.language.encoder.client import EncodeClient, EncodeClientConfig, EncodeError
from services.language.encoder.rpc import ErrorKind
from shared.wire.errors import LinkRefusedError, SecurityConfigError
from shared.wire.images import ImageRef
from shared.wire.link import join_link
from shared.wire.security import TOKEN_METADATA_KEY, TLSFiles
from tests.encode.helpers import EncodeProcess, png_bytes
from tests.encode.pki import PKI, make_pki

TOKEN = "s3cret-token-for-tests-0123456789"


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Float noise only: the replica and this process may pick different CPU kernels.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _credentials(pki: PKI, client_pair: bool = False, ca=None) -> grpc.ChannelCredentials:
    cert = key = None
    if client_pair:
        cert, key = pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    return grpc.ssl_channel_credentials((ca or pki.ca).read_bytes(), key, cert)


@pytest.fixture(scope="module")
def replicas(tiny_vl_dir, tmp_path_factory, pki):
    """`tls`: TLS and a token; `mtls`: TLS that requires a client certificate from the CA."""
    workdir = tmp_path_factory.mktemp("secure")
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    server = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    tls = EncodeProcess(
        tiny_vl_dir,
        workdir,
        *server,
        "--internal-token-file",
        str(token_file),
        name="tls",
        credentials=_credentials(pki),
    )
    mtls = EncodeProcess(
        tiny_vl_dir,
        workdir,
        *server,
        "--tls-ca",
        str(pki.ca),
        name="mtls",
        credentials=_credentials(pki, client_pair=True),
    )
    try:
        tls.start()
        mtls.start()
        yield types.SimpleNamespace(tls=tls.wait_serving(), mtls=mtls.wait_serving())
    finally:
        tls.stop()
        mtls.stop()


def _info(channel, token: str | None = None):
    metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
    return pb_grpc.EncodeServiceStub(channel).GetInfo(
        pb.GetInfoRequest(), timeout=5, metadata=metadata
    )


def _encode_inline(channel, data: bytes, token: str | None) -> bytes:
    metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
    request = pb.EncodeRequest(images=[pb.ImageInput(data=data)])
    messages = list(
        pb_grpc.EncodeServiceStub(channel).Encode(request, timeout=30, metadata=metadata)
    )
    return b"".join(m.chunk.data for m in messages[1:])


def test_calls_without_the_token_are_unauthenticated_and_the_service_keeps_serving(
    replicas, reference
):
    service = replicas.tls
    data = png_bytes(96, 64, seed=11)
    with service.channel() as channel:
        for token in (None, "wrong", TOKEN + "x", ""):
            with pytest.raises(grpc.RpcError) as err:
                _info(channel, token)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN_METADATA_KEY in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                _encode_inline(channel, data, token)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # reflection too
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for probes; the right token gets real work done.
        assert service.health() == health_pb2.HealthCheckResponse.SERVING
        assert _info(channel, TOKEN).hidden_size == 64
        raw = _encode_inline(channel, data, TOKEN)
    got = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(-1, 192)
    _close(got, reference.encode(data))
    log = service.log()
    assert "refused /splitvl.encode.v1.EncodeService/GetInfo: wrong internal token" in log
    assert TOKEN not in log and "wrong" not in log.replace("wrong internal token", "")


def test_plaintext_and_unverified_clients_are_refused(replicas, pki):
    for service in (replicas.tls, replicas.mtls):
        with grpc.insecure_channel(service.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                _info(channel, TOKEN)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept the replica's certificate.
        with grpc.secure_channel(service.address, _credentials(pki, ca=pki.other_ca)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                _info(channel, TOKEN)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Mutual TLS: a client without a certificate from the CA does not get in.
    with grpc.secure_channel(replicas.mtls.address, _credentials(pki)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _info(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with replicas.mtls.channel() as channel:
        assert _info(channel).hidden_size == 64


def _client_encode(address, images, **config):
    async def run():
        client = EncodeClient(EncodeClientConfig((address,), **config))
        try:
            return await client.encode(images), client
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("transport", ["grpc", "nccl"])
def test_the_encode_client_round_trips_over_tls_with_the_token(replicas, pki, reference, transport):
    data = png_bytes(120, 80, seed=12)
    tls = TLSFiles(ca=pki.ca.read_bytes())
    [got], _ = _client_encode(
        replicas.tls.address, [ImageRef(data)], transport=transport, tls=tls, internal_token=TOKEN
    )
    _close(got.packed, reference.encode(data))
    client_pair = TLSFiles(pki.client_cert.read_bytes(), pki.client_key.read_bytes(), tls.ca)
    [got], _ = _client_encode(
        replicas.mtls.address, [ImageRef(data)], transport=transport, tls=client_pair
    )
    _close(got.packed, reference.encode(data))
    with pytest.raises(EncodeError) as err:  # not retried: another attempt cannot fix it
        _client_encode(
            replicas.tls.address,
            [ImageRef(data)],
            transport=transport,
            tls=tls,
            internal_token="wrong",
        )
    assert err.value.kind is ErrorKind.UNAUTHENTICATED


def test_a_wrong_token_stops_the_language_service_at_its_handshake(replicas, pki):
    async def handshake(token):
        config = EncodeClientConfig(
            (replicas.tls.address,), tls=TLSFiles(ca=pki.ca.read_bytes()), internal_token=token
        )
        client = EncodeClient(config)
        try:
            return await client.check_replicas(5)
        finally:
            await client.close()

    with pytest.raises(SecurityConfigError, match="refused this service's internal token"):
        asyncio.run(handshake("wrong"))
    assert asyncio.run(handshake(TOKEN))[replicas.tls.address].contract.hidden_size == 64


def test_the_language_service_flags_reach_the_encode_client(replicas, pki, tmp_path, reference):
    from services.language.cli import build_parser, service_config
    from services.language.server import build_encoder

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = build_parser().parse_args(
        [
            "--model",
            "unused",
            "--encode",
            replicas.tls.address,
            "--internal-token-file",
            str(token_file),
            "--encode-tls-ca",
            str(pki.ca),
            "--encode-attempt-timeout",
            "7.5",
        ]
    )
    text_only = types.SimpleNamespace(model_config=types.SimpleNamespace(is_vl=False))
    data = png_bytes(64, 96, seed=13)

    async def run():
        client = build_encoder(service_config(args), text_only)
        try:
            return client.config, await client.encode([ImageRef(data)])
        finally:
            await client.close()

    config, [got] = asyncio.run(run())
    assert config.attempt_timeout_s == 7.5 and config.internal_token == TOKEN
    assert TOKEN not in repr(config)
    _close(got.packed, reference.encode(data))


def test_link_peers_without_the_secret_are_refused_while_the_client_keeps_working(
    replicas, pki, reference
):
    service = replicas.tls
    images = [png_bytes(72, 72, seed=20 + i) for i in range(3)]
    config = EncodeClientConfig(
        (service.address,), "nccl", tls=TLSFiles(ca=pki.ca.read_bytes()), internal_token=TOKEN
    )

    async def run():
        client = EncodeClient(config)
        try:
            [first] = await client.encode([ImageRef(images[0])])
            link_id = client.link_id(service.address)
            with service.channel() as channel:
                stub = pb_grpc.EncodeServiceStub(channel)
                metadata = ((TOKEN_METADATA_KEY, TOKEN),)
                offer = stub.OpenLink(
                    pb.OpenLinkRequest(device="cpu"), timeout=5, metadata=metadata
                )
            where = (offer.store_host, offer.store_port, 1, "cpu", 5.0)
            # A peer that got an offer but guesses its secret; one that joins the client's link.
            for target, secret in ((offer.link_id, "guess"), (link_id, "guess")):
                with pytest.raises(LinkRefusedError):
                    await asyncio.to_thread(join_link, target, *where, secret=secret)
            [second] = await client.encode([ImageRef(images[1])])
            [third] = await client.encode([ImageRef(images[2])])
            return first, second, third, link_id, client.link_id(service.address), client.retries
        finally:
            await client.close()

    first, second, third, link_before, link_after, retries = asyncio.run(run())
    assert link_after == link_before and retries == 0  # the client's link was never disturbed
    for data, got in zip(images, (first, second, third), strict=True):
        _close(got.packed, reference.encode(data))
    assert "without the link's secret; refused" in service.log()
