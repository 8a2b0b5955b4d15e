"""Extreme values in every field of the request schemas: no 5xx, no dropped connection.

The fields come from the routes' own pydantic schemas (so a new field is covered the day it is
added); each example sets one or two of them to an extreme of its JSON type: integers past 32 and
64 bits either way, floats out of range and not finite (written as the non-standard tokens some
clients send), strings that are empty, long, control characters, lone UTF-16 surrogates, raw
bytes that are not UTF-8, template and special-token text. Every request of a run goes over ONE
keep-alive connection: a server that answered with a 5xx, or closed the connection after
answering, fails the property.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.language.engine import EngineConfig
from services.language.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeChatRequest,
)
from tests.e2e.inprocess import language_server
from tests.e2e.support import servable_copy

MODEL = "tiny"
EXAMPLES = 120
INTS = (0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64)
INTS += (2**80, -(2**63), -(2**63) - 1, -(2**70))
# Raw JSON number text: out of double range, not finite (Python's json reads NaN and Infinity)
FLOATS = ("0.0", "-0.0", "1e-320", "1e308", "-1e308", "1e400", "NaN", "Infinity", "-Infinity")
FLOATS += ("2.5", "-2.5", "100.0000001")
STRINGS = (
    '""',
    json.dumps("a" * 20_000),
    json.dumps("\x00\x01\x1f"),
    '"\\ud800"',  # a lone high surrogate, escaped
    '"x\\udc00y"',  # a lone low surrogate
    '"\\ud83d\\ude00"',  # a paired one: an emoji, valid
    '"\xff\xfe"',  # replaced by raw bytes that are not UTF-8 below
    json.dumps("\u202e\u200b\ufeff"),
    json.dumps("{{ raise_exception('x') }}{% for %}"),
    json.dumps("<|im_start|><|image_pad|><|vision_end|>"),
    json.dumps("９９"),
)
RAW_NOT_UTF8 = '"\xff\xfe"'


def _kinds(schema: dict) -> set[str]:
    """The JSON types a property schema admits (through anyOf / oneOf)."""
    kinds = set()
    for branch in schema.get("anyOf", schema.get("oneOf", [schema])):
        kind = branch.get("type")
        if kind == "array":
            items = _kinds(branch.get("items", {}))
            kinds |= {f"array:{item}" for item in items} or {"array:string"}
        elif kind is not None:
            kinds.add(kind)
    return kinds or {"string", "integer", "object"}


def _values(kind: str) -> list[str]:
    """JSON texts of extreme values of one kind."""
    if kind == "integer":
        return [str(v) for v in INTS]
    if kind == "number":
        return list(FLOATS) + [str(v) for v in INTS[3:]]
    if kind == "string":
        return list(STRINGS)
    if kind == "boolean":
        return ["true", "false", "0", '"yes"']
    if kind.startswith("array:"):
        return [f"[{v}]" for v in _values(kind.split(":", 1)[1])] + ["[]"]
    # objects (logit_bias, metadata, kwargs): extreme keys and values
    return ["{}"] + [f"{{{k}: {v}}}" for k in STRINGS[:5] for v in ("1", "1e400", str(2**80))]


def _fields(model) -> list[tuple[str, str]]:
    schema = model.model_json_schema()
    return sorted(
        (name, value)
        for name, prop in schema["properties"].items()
        for kind in sorted(_kinds(prop))
        for value in _values(kind)
    )


CASES = {
    "/v1/chat/completions": (
        _fields(ChatCompletionRequest),
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    "/v1/completions": (
        _fields(CompletionRequest),
        {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    ),
    "/tokenize": (
        _fields(TokenizeChatRequest),
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    ),
}
# The message text itself, extreme too
CASES["/v1/chat/completions"][0].extend(
    ("messages", f'[{{"role": "user", "content": {s}}}]') for s in STRINGS
)


def _body(base: dict, overrides: list[tuple[str, str]]) -> bytes:
    """`base` with raw JSON values put in by text (they need not be valid Python JSON)."""
    fields = {name: json.dumps(value) for name, value in base.items()}
    fields.update(overrides)
    text = "{" + ", ".join(f"{json.dumps(name)}: {value}" for name, value in fields.items()) + "}"
    body = text.encode("utf-8", "surrogatepass")
    return body.replace(RAW_NOT_UTF8.encode("utf-8"), b'"\xff\xfe"')


@pytest.fixture(scope="module")
def client(tiny_vl, tmp_path_factory):
    served = servable_copy(tiny_vl[0], tmp_path_factory.mktemp("extremes_served"))
    engine = EngineConfig(kv_cache_memory=8 * 2**20, max_model_len=64)
    with language_server(served, None, engine, model_name=MODEL, max_request_bytes=1 << 20) as srv:
        # One connection for every request: a server that drops it fails the next request
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(base_url=srv.base_url, timeout=60, limits=limits) as c:
            yield c


def _check(client: httpx.Client, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    where = f"{path} {body[:300]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
    reply = response.json()
    if response.status_code >= 400:
        assert set(reply) == {"error"} and reply["error"]["message"], where


@pytest.mark.parametrize("path", sorted(CASES))
def test_extreme_values_get_4xx_or_an_answer_never_5xx_or_a_reset(client, path):
    fields, base = CASES[path]
    one = st.sampled_from(fields)

    @given(overrides=st.lists(one, min_size=1, max_size=2, unique_by=lambda f: f[0]))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(overrides):
        _check(client, path, _body(base, overrides))

    run()


def test_the_cases_cover_the_fields_the_issue_names():
    names = {name for name, _ in CASES["/v1/chat/completions"][0]}
    assert {"seed", "n", "max_tokens", "top_k", "logit_bias", "temperature"} <= names
    assert ("seed", str(2**80)) in CASES["/v1/chat/completions"][0]
    assert ("n", str(2**63)) in CASES["/v1/completions"][0]


def test_the_named_inputs_are_4xx_on_one_connection(client):
    base = CASES["/v1/chat/completions"][1]
    for overrides in (
        [("messages", '[{"role": "user", "content": "\\ud800"}]')],
        [("messages", '[{"role": "user", "content": "\xff\xfe"}]')],
        [("seed", str(2**80))],
        [("seed", str(-(2**70)))],
        [("n", str(2**63))],
        [("top_k", str(2**80))],
        [("logit_bias", '{"²": 1}')],
    ):
        body = _body(base, overrides)
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (overrides, response.text)
