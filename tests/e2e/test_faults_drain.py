"""Faults of one language process, in order: model steps that raise (the hidden
--inject-step-faults test hook), readiness when the encode replica goes away, and SIGTERM.

- A failing step fails the requests it carried with 500 (an OpenAI error body, or an error event
  in a stream) and the service serves the next requests.
- /health is liveness (200 while the process and its engine thread live), /ready readiness
  (503 with the reason once no encode replica is serving, or while draining).
- SIGTERM: new requests get 503, /ready 503, gRPC health NOT_SERVING; a stream that finishes
  within --drain-timeout finishes normally, one still running then ends with an error event;
  then the process exits.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from scripts.testkit.launch import grpc_health
from tests.e2e.load import StreamResult, base_cases, chat_body, load_cluster, png, wait_until
from tests.e2e.support import wait_for_idle_kv

MODEL = "shapes-vl"
DRAIN_TIMEOUT_S = 3.0
FAULT_STEPS = (3, 6)
LANGUAGE_ARGS = [
    "--served-model-name",
    MODEL,
    "--max-model-len",
    "4096",
    "--kv-cache-memory",
    "64MiB",
    "--drain-timeout",
    str(DRAIN_TIMEOUT_S),
    "--inject-step-faults",
    ",".join(map(str, FAULT_STEPS)),
]


@pytest.fixture(scope="module")
def cluster(e2e_model, tmp_path_factory):
    if not e2e_model.trained:
        pytest.skip("needs the trained shapes model")
    with load_cluster(
        e2e_model.path, tmp_path_factory.mktemp("faults"), 1, LANGUAGE_ARGS
    ) as running:
        yield running


def _post(cluster, body, timeout=60) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}/v1/chat/completions", json=body, timeout=timeout)


def _stream(cluster, body, result: StreamResult, first: threading.Event) -> None:
    import json

    with httpx.stream(
        "POST", f"{cluster.base_url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        result.status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result.done = True
                break
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                result.error = event["error"]["message"]
                continue
            for choice in event["choices"]:
                result.text += choice["delta"].get("content") or ""
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if result.text:
                    first.set()


def _text_body(max_tokens: int, stream: bool) -> dict:
    body = chat_body(MODEL, "Count to a thousand.", None, max_tokens, stream)
    return {**body, "ignore_eos": True}


def test_a_failing_model_step_fails_its_requests_and_the_service_serves_on(cluster):
    # Step 3 is the third step of the first request (prefill, decode, decode)
    response = _post(cluster, _text_body(8, stream=False))
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "engine_step_failed" and "retried" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    # Step 6 fails the second request mid-stream: its stream ends with an error event
    result, first = StreamResult(), threading.Event()
    _stream(cluster, _text_body(8, stream=True), result, first)
    assert result.status == 200 and result.done and result.text, result
    assert result.error is not None and "model step" in result.error
    # Everything after is served, images included
    image, question = base_cases(1)[0]
    for _ in range(3):
        response = _post(cluster, chat_body(MODEL, question, png(image), stream=False))
        assert response.status_code == 200, response.text
    wait_for_idle_kv(cluster.base_url)
    assert "engine step failed" in cluster.language.log()


def test_ready_follows_the_encode_replicas_and_health_stays_up(cluster):
    ready = httpx.get(f"{cluster.base_url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    cluster.encodes[0].stop()

    def not_ready():
        response = httpx.get(f"{cluster.base_url}/ready", timeout=10)
        return response.status_code == 503 and response.json()

    body = wait_until(not_ready, 15, "/ready 503 after the encode replica stopped")
    assert body["reason"] == "no encode replica is serving"
    assert httpx.get(f"{cluster.base_url}/health", timeout=10).status_code == 200
    # Text-only requests still work without the encode service
    assert _post(cluster, _text_body(4, stream=False)).status_code == 200


def test_sigterm_drains_then_exits(cluster):
    long_result, short_result = StreamResult(), StreamResult()
    long_first, short_first = threading.Event(), threading.Event()
    threads = [
        threading.Thread(
            target=_stream, args=(cluster, _text_body(3000, True), long_result, long_first)
        ),
        threading.Thread(
            target=_stream, args=(cluster, _text_body(24, True), short_result, short_first)
        ),
    ]
    for thread in threads:
        thread.start()
    assert long_first.wait(30) and short_first.wait(30)
    language = cluster.language
    language.signal(signal.SIGTERM)
    sent = time.monotonic()

    def draining():
        response = httpx.get(f"{cluster.base_url}/ready", timeout=5)
        return response.status_code == 503 and "draining" in response.json()["reason"]

    wait_until(draining, 5, "/ready 503 while draining", poll_s=0.02)
    refused = _post(cluster, _text_body(4, stream=False), timeout=10)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{cluster.base_url}/health", timeout=5).status_code == 200
    assert grpc_health(cluster.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    _check_grpc_generate_refused(cluster.grpc_address)

    for thread in threads:
        thread.join(timeout=DRAIN_TIMEOUT_S + 30)
    # The short stream finished on its own; the long one was cut at the drain timeout
    assert short_result.done and short_result.error is None
    assert short_result.finish_reason == "length"
    assert long_result.done and long_result.finish_reason is None
    assert long_result.error is not None and "drain timeout" in long_result.error
    language.process.wait(timeout=30)
    exited_after = time.monotonic() - sent
    assert language.process.returncode == 0, language.log_tail()
    assert DRAIN_TIMEOUT_S <= exited_after < DRAIN_TIMEOUT_S + 15
    log = language.log()
    assert "draining" in log and "drain timeout: ending 1 request(s)" in log
    print(
        f"drain: short stream finished ({len(short_result.text)} chars), long stream cut "
        f"with an error event, exit 0 after {exited_after:.1f} s"
    )


def _check_grpc_generate_refused(address: str) -> None:
    from proto.splitvl.language.v1 import language_pb2 as pb
    from proto.splitvl.language.v1 import language_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(
        messages=[pb.Message(role="user", content=[pb.ContentPart(text="hi")])],
        sampling=pb.SamplingParams(temperature=0, max_tokens=4),
    )
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            list(pb_grpc.LanguageServiceStub(channel).Generate(request, timeout=10))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
