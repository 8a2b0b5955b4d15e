"""The request gate's JSON shape limits and secret comparison, without a server."""

from __future__ import annotations

import hmac
import json
import time

from services.common.auth import bearer_matches
from services.language.openai_api.gate import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    json_shape_error,
)
from shared.wire.security import secrets_match


def test_depth_is_counted_outside_strings_only():
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert "deeper than 64" in json_shape_error(deep).message
    assert json_shape_error(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None
    # brackets inside strings, escaped quotes included, are text
    text = json.dumps({"content": '\\"[[[' + "[" * 500 + '"{{{'}).encode()
    assert json_shape_error(text) is None
    wide = json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}] * 300})
    assert json_shape_error(wide.encode()) is None


def test_too_many_values_is_413_and_checks_are_fast():
    error = json_shape_error(b"[" + b"[]," * MAX_JSON_CONTAINERS + b"[]]")
    assert error.status_code == 413 and "too many JSON values" in error.message
    big_string = b'{"url": "data:image/png;base64,' + b"A" * 32_000_000 + b'"}'
    start = time.monotonic()
    assert json_shape_error(big_string) is None
    assert time.monotonic() - start < 1.0


def test_secrets_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert secrets_match("sk-right", "sk-right")
    assert not secrets_match("sk-wrong-and-longer", "sk-right")
    # Hashed first: both sides are 32-byte digests whatever the key lengths
    assert calls == [(32, 32), (32, 32)]


def test_bearer_keys_are_checked_by_scheme_and_value():
    assert bearer_matches("Bearer sk-right", "sk-right")
    assert bearer_matches("bearer  sk-right ", "sk-right")
    for header in (None, "", "sk-right", "Basic sk-right", "Bearer sk-wrong", "Bearer"):
        assert not bearer_matches(header, "sk-right")


def test_a_failing_route_is_a_500_answer_not_an_exception_to_the_server():
    import asyncio

    from services.language.openai_api.gate import RequestGate

    async def failing_app(scope, receive, send):
        raise RuntimeError("a bug in a route")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    gate = RequestGate(failing_app, api_key=None, max_request_bytes=1 << 20)
    asyncio.run(gate(scope, receive, send))  # nothing raised: the server keeps the connection
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["message"] == "internal server error"  # no internals
    assert "a bug" not in json.dumps(body)


def test_bodies_that_are_not_unicode_text_are_refused_before_parsing():
    from services.language.openai_api.gate import body_error

    assert body_error(b'{"a": "caf\xc3\xa9 \\ud83d\\ude00"}') is None  # UTF-8 and a paired escape
    for bad, fragment in (
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b'{"a": "\xed\xa0\x80"}', "not valid UTF-8"),  # a surrogate encoded raw
        (b'{"a": "\\ud800"}', "unpaired UTF-16 surrogate"),
        (b'{"a": ["x", {"\\udfff": 1}]}', "unpaired UTF-16 surrogate"),
    ):
        error = body_error(bad)
        assert error is not None and error.status_code == 400 and fragment in error.message
    assert body_error(b'{"a": "\\\\ud800"}') is None  # an escaped backslash: plain text
