"""Fuzzed requests to every EncodeService method, sent as raw bytes over a generic channel call:
each gets a status with a message that is never INTERNAL or UNKNOWN, and the service keeps
serving. Hypothesis, derandomized, EXAMPLES_PER_METHOD examples per method (random messages of
the method's request type, truncated or bit-flipped ones, noise), plus requests with huge
repeated fields within the receive limit."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.splitvl.encode.v1 import encode_pb2 as pb
from shared.wire.images import content_hash
from tests.encode.fuzz import RawCaller, payloads
from tests.encode.helpers import EncodeProcess, png_bytes

EXAMPLES_PER_METHOD = 80
SERVICE = "splitvl.encode.v1.EncodeService"
METHODS = {  # name -> (request type, server streaming)
    "Encode": (pb.EncodeRequest, True),
    "Transfer": (pb.TransferRequest, True),
    "GetInfo": (pb.GetInfoRequest, False),
    "OpenLink": (pb.OpenLinkRequest, False),
    "CloseLink": (pb.CloseLinkRequest, False),
    "GetMetrics": (pb.GetMetricsRequest, False),
}
_PNG = png_bytes(40, 40, seed=3)
_PIXELS = st.one_of(st.just(0), st.integers(0, 70_000), st.integers(0, 2**64 - 1))
# Steer some fields towards values the service accepts, so fuzzing reaches past validation.
_OVERRIDES = {
    "splitvl.encode.v1.ImageInput.data": st.one_of(st.just(_PNG), st.binary(max_size=64)),
    "splitvl.encode.v1.ImageInput.url": st.one_of(
        st.just("data:image/png;base64,iVBORw0KGgo="), st.text(max_size=40)
    ),
    "splitvl.encode.v1.ImageInput.content_hash": st.one_of(
        st.just(""), st.just(content_hash(_PNG)), st.text(max_size=64)
    ),
    "splitvl.encode.v1.ImageInput.min_pixels": _PIXELS,
    "splitvl.encode.v1.ImageInput.max_pixels": _PIXELS,
    "splitvl.encode.v1.EncodeRequest.transport": st.sampled_from([0, 1, 1, 1, 2, 7]),
    "splitvl.encode.v1.OpenLinkRequest.device": st.sampled_from(["cpu", "", "cuda:0", "tpu"]),
}
_ALLOWED = set(grpc.StatusCode) - {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.fixture(scope="module")
def service(tiny_vl_dir, tmp_path_factory):
    # Short-lived, few links: fuzzed OpenLink calls open links nobody joins.
    args = ("--link-timeout", "3", "--max-links", "8", "--max-images-per-request", "4")
    proc = EncodeProcess(tiny_vl_dir, tmp_path_factory.mktemp("fuzz"), *args, name="fuzz")
    try:
        yield proc.start().wait_serving()
    finally:
        proc.stop()


def _check(caller: RawCaller, payload: bytes) -> None:
    code, details = caller(payload)
    assert code in _ALLOWED, f"{caller.path} answered {code.name} ({details!r}) to {payload!r}"
    assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"


def _still_serves(service) -> None:
    with service.channel() as channel:
        caller = RawCaller(channel, f"/{SERVICE}/Encode", streaming=True)
        request = pb.EncodeRequest(images=[pb.ImageInput(data=png_bytes(64, 64, seed=4))])
        assert caller(request.SerializeToString(), timeout=30)[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("method", list(METHODS))
def test_fuzzed_requests_get_a_status_with_a_message(service, method):
    request_type, streaming = METHODS[method]
    with service.channel() as channel:
        caller = RawCaller(channel, f"/{SERVICE}/{method}", streaming)

        @settings(
            max_examples=EXAMPLES_PER_METHOD,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(payloads(request_type.DESCRIPTOR, _OVERRIDES))
        def fuzz(payload):
            _check(caller, payload)

        fuzz()
        print(method, dict(caller.codes))  # shown with pytest -rP
    assert sum(caller.codes.values()) >= EXAMPLES_PER_METHOD
    _still_serves(service)


def _huge_requests() -> dict[str, tuple[str, bytes]]:
    many_images = pb.EncodeRequest(images=[pb.ImageInput(content_hash="ab" * 32)] * 200_000)
    many_tickets = pb.TransferRequest(link_id="x", tickets=range(1, 1_000_001))
    long_id = pb.CloseLinkRequest(link_id="l" * (8 << 20))
    # A field number GetInfoRequest does not have, holding 16 MiB: parsed and ignored.
    unknown_field = b"\x0a" + _varint(16 << 20) + b"\0" * (16 << 20)
    return {
        "many_images": ("Encode", many_images.SerializeToString()),
        "many_tickets": ("Transfer", many_tickets.SerializeToString()),
        "long_link_id": ("CloseLink", long_id.SerializeToString()),
        "unknown_field": ("GetInfo", unknown_field),
        "deep_garbage": ("OpenLink", b"\x0a\xff\xff\xff\xff\x0f" + b"\x0a" * 1000),
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("case", list(_huge_requests()))
def test_huge_repeated_fields_within_the_limit(service, case):
    method, payload = _huge_requests()[case]
    with service.channel() as channel:
        _check(RawCaller(channel, f"/{SERVICE}/{method}", METHODS[method][1]), payload)
    _still_serves(service)
