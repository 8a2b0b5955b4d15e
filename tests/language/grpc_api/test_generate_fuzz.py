"""Fuzzed requests to the language service's gRPC Generate, sent as raw bytes over a generic
channel call. Well-formed messages with random content (hypothesis, derandomized, EXAMPLES
examples) each get a status with a message, never INTERNAL or UNKNOWN, and the service keeps
serving. Bytes that do not parse get INVALID_ARGUMENT with a message (the servicer parses
requests itself)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.splitvl.language.v1 import language_pb2 as pb
from scripts.testkit.launch import start_language
from tests.e2e.support import servable_copy
from tests.encode.fuzz import RawCaller, messages, payloads

EXAMPLES = 100
PATH = "/splitvl.language.v1.LanguageService/Generate"
_SMALL = st.one_of(st.integers(-3, 8), st.sampled_from([2**31 - 1, -(2**31)]))
_FIELDS = {
    "splitvl.language.v1.Message.role": st.one_of(
        st.sampled_from(["user", "system", "assistant"]), st.text(max_size=8)
    ),
    "splitvl.language.v1.SamplingParams.max_tokens": _SMALL,
    "splitvl.language.v1.SamplingParams.logprobs": _SMALL,
    "splitvl.language.v1.GenerateRequest.model": st.sampled_from(["", "tiny", "other"]),
}
# Half the time a plain user message and default sampling, so fuzzing also reaches generation.
_USER = st.text(min_size=1, max_size=30).map(
    lambda text: pb.Message(role="user", content=[pb.ContentPart(text=text)])
)
_OVERRIDES = {
    **_FIELDS,
    "splitvl.language.v1.GenerateRequest.messages": st.one_of(
        _USER, messages(pb.Message.DESCRIPTOR, _FIELDS)
    ),
    "splitvl.language.v1.GenerateRequest.sampling": st.one_of(
        _SMALL.filter(lambda n: 1 <= n <= 8).map(lambda n: pb.SamplingParams(max_tokens=n)),
        messages(pb.SamplingParams.DESCRIPTOR, _FIELDS),
    ),
}
_ALLOWED = set(grpc.StatusCode) - {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.fixture(scope="module")
def language(tiny_vl_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generate_fuzz")
    model = servable_copy(tiny_vl_dir, workdir / "tiny")
    args = ["--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "16MiB"]
    proc, _, address = start_language(model, workdir, args)
    try:
        yield address
    finally:
        proc.stop()


def _generate(channel, request: pb.GenerateRequest) -> grpc.StatusCode:
    caller = RawCaller(channel, PATH, streaming=True)
    return caller(request.SerializeToString(), timeout=60)[0]


def _fuzz(language, strategy, examples: int) -> dict:
    with grpc.insecure_channel(language) as channel:
        caller = RawCaller(channel, PATH, streaming=True)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def fuzz(payload):
            code, details = caller(payload, timeout=20)
            assert code in _ALLOWED, f"Generate answered {code.name} ({details!r}) to {payload!r}"
            assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"

        try:
            fuzz()
        finally:
            print("Generate", dict(caller.codes))  # shown with pytest -rP
        hello = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=[pb.ContentPart(text="hello")])],
            sampling=pb.SamplingParams(max_tokens=4, temperature=0),
        )
        assert _generate(channel, hello) == grpc.StatusCode.OK
    assert sum(caller.codes.values()) >= examples
    return dict(caller.codes)


def test_fuzzed_well_formed_generate_requests_get_a_status_with_a_message(language):
    well_formed = messages(pb.GenerateRequest.DESCRIPTOR, _OVERRIDES).map(
        lambda m: m.SerializeToString()
    )
    codes = _fuzz(language, well_formed, EXAMPLES)
    assert codes.get("OK", 0) > 0  # some got as far as generating


def test_malformed_generate_bytes_get_invalid_argument(language):
    codes = _fuzz(language, payloads(pb.GenerateRequest.DESCRIPTOR, _OVERRIDES), EXAMPLES // 4)
    assert codes.get("INVALID_ARGUMENT", 0) > 0  # some bytes did not parse, and said so
