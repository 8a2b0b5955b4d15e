"""Every documented failure gets its status and OpenAI error JSON, and the server keeps serving."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from services.language.engine import EngineConfig
from services.language.frontend.images import ImageFetchConfig
from tests.e2e.inprocess import language_server
from tests.e2e.support import data_url, png_bytes, read_metrics, servable_copy, wait_for_idle_kv

MODEL = "tiny"
KEY = "sekret"
MAX_MODEL_LEN = 256
MAX_IMAGE_BYTES = 4000
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served_dir(tiny_vl, tmp_path_factory):
    return servable_copy(tiny_vl[0], tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(served_dir):
    from tests.e2e.support import InProcessEncoder

    fetch = ImageFetchConfig(allow_http=True, max_image_bytes=MAX_IMAGE_BYTES)
    engine = EngineConfig(kv_cache_memory=8 * 2**20, max_model_len=MAX_MODEL_LEN)
    with language_server(
        served_dir,
        InProcessEncoder(served_dir),
        engine,
        api_key=KEY,
        fetch=fetch,
        model_name=MODEL,
        max_request_bytes=200_000,
    ) as srv:
        yield srv


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def chat(content, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        **extra,
    }


def image_part(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


VALID = chat(image_part(data_url(png_bytes(32, 32))))
LONG_TEXT = "word " * 300  # one token per byte: far over the context


CASES = {
    "malformed_json": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    "missing_messages": ({"model": MODEL}, 400, "messages"),
    "empty_messages": ({"model": MODEL, "messages": []}, 400, "messages"),
    "unknown_content_part": (chat([{"type": "audio", "audio": {}}]), 400, "audio"),
    "bad_base64": (chat(image_part("data:image/png;base64,!!not-base64!!")), 400, "base64"),
    "data_url_not_an_image": (
        chat(image_part(data_url(b"just some text, not pixels"))),
        400,
        "not a recognized image",
    ),
    "oversized_image": (chat(image_part(data_url(noise_png(64)))), 413, "above the limit"),
    "private_address_url": (
        chat(image_part("http://127.0.0.1:1/cat.png")),
        400,
        "non-public address",
    ),
    "metadata_address_url": (
        chat(image_part("http://169.254.169.254/latest")),
        400,
        "non-public address",
    ),
    "prompt_over_context": (chat(LONG_TEXT), 400, f"maximum context length is {MAX_MODEL_LEN}"),
    "max_tokens_over_context": (chat("hi", max_tokens=MAX_MODEL_LEN), 400, "lower max_tokens"),
    "negative_max_tokens": (chat("hi", max_tokens=-1), 400, "max_tokens"),
    "zero_max_completion_tokens": (chat("hi", max_completion_tokens=0), 400, "max_tokens"),
    "bad_temperature": (chat("hi", temperature=-1), 400, "temperature"),
    "top_logprobs_without_logprobs": (chat("hi", top_logprobs=2), 400, "logprobs"),
    "too_many_choices": (chat("hi", n=100), 400, "n must be"),
    "image_in_system_message": (
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": image_part(data_url(png_bytes(8, 8)))},
                {"role": "user", "content": "hi"},
            ],
        },
        400,
        "only in user",
    ),
    "unknown_model": ({**chat("hi"), "model": "gpt-4"}, 404, "does not exist"),
    "body_too_large": (chat("x" * 250_000), 413, "above the limit"),
    # OpenAI's ranges
    "temperature_over_2": (chat("hi", temperature=3), 400, "temperature"),
    "five_stop_sequences": (chat("hi", stop=list("abcde")), 400, "at most 4"),
    "top_logprobs_over_20": (chat("hi", logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "zero_max_tokens": (chat("hi", max_tokens=0), 400, "max_tokens"),
    "zero_choices": (chat("hi", n=0), 400, "n must be"),
    "logit_bias_out_of_range": (chat("hi", logit_bias={"5": 150}), 400, "[-100, 100]"),
    "logit_bias_not_a_token_id": (chat("hi", logit_bias={"abc": 1}), 400, "token ids"),
    "logit_bias_over_the_vocab": (chat("hi", logit_bias={"999999": 1}), 400, "logit_bias"),
    # Output-changing OpenAI fields that are not implemented
    "audio_output": (chat("hi", audio={"voice": "alloy", "format": "wav"}), 400, "audio"),
    "audio_modality": (chat("hi", modalities=["text", "audio"]), 400, "modalities"),
    "prediction": (chat("hi", prediction={"type": "content", "content": "x"}), 400, "prediction"),
    "web_search": (chat("hi", web_search_options={}), 400, "web_search_options"),
    "legacy_functions": (chat("hi", functions=[{"name": "f"}]), 400, "functions"),
    "verbosity": (chat("hi", verbosity="high"), 400, "verbosity"),
    "tools_without_auto_tool_choice": (
        chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "--enable-auto-tool-choice",
    ),
    "tool_choice_without_tools": (chat("hi", tool_choice="required"), 400, "needs tools"),
    "malformed_tool": (chat("hi", tools=[{"type": "function"}]), 400, "tools[0]"),
}


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"k": value}
    return value


CASES.update(
    {
        # OpenAI's ranges not covered above
        "top_p_over_1": (chat("hi", top_p=1.5), 400, "top_p"),
        "top_p_zero": (chat("hi", top_p=0), 400, "top_p"),
        "presence_penalty_over_2": (chat("hi", presence_penalty=2.5), 400, "presence_penalty"),
        "frequency_penalty_under_minus_2": (
            chat("hi", frequency_penalty=-3),
            400,
            "frequency_penalty",
        ),
        "negative_top_logprobs": (chat("hi", logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
        "seed_not_an_integer": (chat("hi", seed="abc"), 400, "seed"),
        "max_tokens_not_an_integer": (chat("hi", max_tokens=2.5), 400, "max_tokens"),
        "temperature_not_a_number": (chat("hi", temperature="hot"), 400, "temperature"),
        # JSON that is too deep or too big is refused before it is parsed
        "deeply_nested_metadata": (chat("hi", metadata=_nested(100)), 400, "deeper than 64"),
        "deeply_nested_arrays": (b"[" * 100_000 + b"]" * 100_000, 400, "deeper than 64"),
        # SSRF spellings of private addresses, with http images on
        "decimal_loopback_url": (
            chat(image_part("http://2130706433/cat.png")),
            400,
            "non-public address",
        ),
        "mapped_ipv6_loopback_url": (
            chat(image_part("http://[::ffff:7f00:1]/cat.png")),
            400,
            "non-public address",
        ),
        "nat64_private_url": (
            chat(image_part("http://[64:ff9b::a00:1]/cat.png")),
            400,
            "non-public address",
        ),
    }
)


def _post(server, body, headers=AUTH, path="/v1/chat/completions") -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(f"{server.base_url}{path}", headers=headers, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert fragment in body["error"]["message"], body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


def assert_still_serving(server) -> None:
    response = _post(server, VALID)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_status_and_body(server, name):
    body, status, fragment = CASES[name]
    error = assert_openai_error(_post(server, body), status, fragment)
    if name == "unknown_model":
        assert error["code"] == "model_not_found" and error["param"] == "model"
    if name == "prompt_over_context":
        assert "the prompt has" in error["message"]  # both numbers are named
    if name == "negative_max_tokens":
        assert error["param"] == "max_tokens"
    assert_still_serving(server)


def test_harmless_fields_are_accepted_and_unknown_ones_named_in_a_warning(server, caplog):
    import logging

    harmless = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "reasoning_effort": "low",
        "seed": 3,
        "prompt_cache_key": "c",
        "safety_identifier": "s",
        "modalities": ["text"],
        "verbosity": "medium",
    }
    with caplog.at_level(logging.WARNING, logger="services.language.openai_api.app"):
        response = _post(server, {**VALID, **harmless, "frobnicate": 1, "zzz_extension": {}})
    assert response.status_code == 200, response.text
    warnings = [r.getMessage() for r in caplog.records if "frobnicate" in r.getMessage()]
    assert len(warnings) == 1 and "zzz_extension" in warnings[0]


def test_prompt_over_context_names_both_numbers(server):
    error = assert_openai_error(_post(server, chat(LONG_TEXT)), 400, "the prompt has")
    prompt_tokens = int(error["message"].split("the prompt has ")[1].split(" ")[0])
    assert prompt_tokens > MAX_MODEL_LEN
    assert str(MAX_MODEL_LEN) in error["message"]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]
)
def test_wrong_or_missing_api_key_is_401(server, headers):
    assert_openai_error(_post(server, VALID, headers=headers), 401, "API key")
    # The key is checked before the body is parsed
    assert_openai_error(_post(server, b"{not json", headers=headers), 401, "API key")
    models = httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10)
    assert models.status_code == 401
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert_still_serving(server)


def test_unknown_route_and_method(server):
    response = httpx.get(f"{server.base_url}/v1/nope", headers=AUTH, timeout=10)
    assert_openai_error(response, 404, "no route")
    response = httpx.get(f"{server.base_url}/v1/chat/completions", headers=AUTH, timeout=10)
    assert_openai_error(response, 405, "Method Not Allowed")


def test_errors_are_counted(server):
    before = read_metrics(server.base_url, labeled=True)
    key = 'splitvl_language_requests_rejected_total{status="404"}'
    _post(server, {**chat("hi"), "model": "nope"})
    after = read_metrics(server.base_url, labeled=True)
    assert after[key] == before.get(key, 0) + 1


@pytest.fixture(scope="module")
def one_slot_server(served_dir):
    engine = EngineConfig(
        kv_cache_memory=32 * 2**20, max_model_len=4096, max_num_seqs=1, max_queue_len=1
    )
    with language_server(served_dir, None, engine, model_name=MODEL) as srv:
        yield srv


def _open_stream(server, max_tokens: int):
    body = {**chat("go", max_tokens=max_tokens, stream=True, ignore_eos=True)}
    http = httpx.Client(timeout=60)
    request = http.build_request("POST", f"{server.base_url}/v1/chat/completions", json=body)
    return http, http.send(request, stream=True)


def test_full_queue_gets_429_with_retry_after(one_slot_server):
    server = one_slot_server
    running_http, running = _open_stream(server, 4000)  # takes the only running slot
    opened = []
    waiter = threading.Thread(target=lambda: opened.append(_open_stream(server, 4)), daemon=True)
    try:
        waiter.start()  # blocks in the queue until the first request ends
        deadline = time.monotonic() + 15
        while read_metrics(server.base_url)["splitvl_language_num_requests_waiting"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        response = _post(server, chat("hi"), headers={})
        error = assert_openai_error(response, 429, "capacity")
        assert error["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        running.close()
        running_http.close()
        waiter.join(timeout=30)
        for http, response in opened:
            response.close()
            http.close()
    wait_for_idle_kv(server.base_url)
    assert _post(server, chat("hi"), headers={}).status_code == 200


def test_deep_json_is_refused_quickly_and_chunked_bodies_are_limited(server):
    body = b'{"model": "tiny", "messages": ' + b"[" * 90_000 + b"]" * 90_000 + b"}"
    start = time.monotonic()
    assert_openai_error(_post(server, body), 400, "deeper than 64")
    assert time.monotonic() - start < 2.0

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(50):
            yield b"x" * 10_000

    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert_openai_error(response, 413, "above the limit")
    assert_still_serving(server)
