"""Structured outputs through the HTTP API on the shipped shapes model, with the openai client:
every answer parses and validates against its schema, streamed or not, alone or batched with a
free request, one matcher per choice; the other constraint fields; bad schemas are 400s."""

from __future__ import annotations

import io
import json
import re
import threading
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from scripts.shapes_vl.data import make_dataset
from tests.e2e.support import data_url
from tests.language.serving import SHAPES_VL, PixelLimitEncoder, chat_server

MODEL = "shapes-vl"
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "color": {"enum": COLORS},
        "count": {"type": "integer", "minimum": 1, "maximum": 3},
        "parts": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["edge", "corner"]}, "round": {"type": "boolean"}},
                "required": ["kind", "round"],
            },
        },
        "label": {"type": "string", "maxLength": 12},
    },
    "required": ["shape", "color", "count", "parts", "label"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}


class Part(BaseModel):
    kind: Literal["edge", "corner"]
    round: bool


class Scene(BaseModel):
    shape: Literal["circle", "square", "triangle"]
    color: Literal["red", "green", "blue", "yellow", "purple", "orange"]
    count: int = Field(ge=1, le=3)
    parts: list[Part] = Field(max_length=2)


@pytest.fixture(scope="module")
def server():
    with chat_server(SHAPES_VL, PixelLimitEncoder(SHAPES_VL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def examples():
    cases = []
    for example in make_dataset(3, 3):
        buf = io.BytesIO()
        example.image.save(buf, format="PNG")
        cases.append((buf.getvalue(), example.question, example.answer))
    return cases


def messages(image: bytes, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_every_answer_validates_streamed_and_not(client, examples):
    for image, question, _ in examples:
        whole = client.chat.completions.create(
            model=MODEL,
            messages=messages(image, question),
            max_tokens=200,
            temperature=0,
            response_format=JSON_SCHEMA,
        )
        assert whole.choices[0].finish_reason == "stop"
        answer = json.loads(whole.choices[0].message.content)
        jsonschema.validate(answer, SCHEMA)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages(image, question),
            max_tokens=200,
            temperature=0,
            response_format=JSON_SCHEMA,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert json.loads(text) == answer  # greedy, with the prompt from the prefix cache
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_sampled_choices_each_follow_the_schema(client, examples):
    image, question, _ = examples[0]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages(image, question),
        max_tokens=200,
        temperature=1.0,
        seed=11,
        n=3,
        response_format=JSON_SCHEMA,
    )
    answers = [json.loads(choice.message.content) for choice in response.choices]
    for answer in answers:
        jsonschema.validate(answer, SCHEMA)
    assert response.usage.prompt_tokens_details.cached_tokens >= 0


def test_logit_bias_forces_a_token(client, examples):
    image, question, _ = examples[0]
    token = 64  # "a" in the shapes tokenizer
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages(image, question),
        max_tokens=3,
        temperature=0,
        logit_bias={str(token): 100},
        extra_body={"return_token_ids": True},
    )
    assert response.choices[0].model_extra["token_ids"] == [token] * 3


def test_parse_with_a_pydantic_model(client, examples):
    image, question, _ = examples[1]
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=messages(image, question),
        max_tokens=200,
        temperature=0,
        response_format=Scene,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Scene)
    assert parsed == Scene.model_validate_json(completion.choices[0].message.content)


def test_structured_and_free_requests_batched_together(client, examples):
    image, question, answer = examples[2]
    alone = client.chat.completions.create(
        model=MODEL, messages=messages(image, question), max_tokens=20, temperature=0
    )
    free_alone = alone.choices[0].message.content
    assert free_alone == answer  # the trained model answers this held-out question right
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages(image, question),
        max_tokens=200,
        temperature=0,
        response_format=JSON_SCHEMA,
        stream=True,
    )
    chunks = iter(stream)
    text = [next(chunks).choices[0].delta.content or "" for _ in range(3)]
    results = {}
    worker = threading.Thread(
        target=lambda: results.setdefault(
            "free",
            client.chat.completions.create(
                model=MODEL, messages=messages(image, question), max_tokens=20, temperature=0
            ),
        )
    )
    worker.start()
    rest = [c for c in chunks if c.choices]
    worker.join(timeout=60)
    text += [c.choices[0].delta.content or "" for c in rest]
    jsonschema.validate(json.loads("".join(text)), SCHEMA)
    assert results["free"].choices[0].message.content == free_alone


def test_vllm_structured_outputs_and_guided_fields(client, examples):
    image, question, _ = examples[0]
    base = dict(model=MODEL, messages=messages(image, question), max_tokens=40, temperature=0)
    choice = client.chat.completions.create(
        **base, extra_body={"structured_outputs": {"choice": ["left", "right", "top"]}}
    )
    assert choice.choices[0].message.content in ("left", "right", "top")
    regex = client.chat.completions.create(**base, extra_body={"guided_regex": "[a-z]{2,5}!"})
    assert re.fullmatch("[a-z]{2,5}!", regex.choices[0].message.content)
    guided = client.chat.completions.create(
        **base, logprobs=True, top_logprobs=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert guided.choices[0].message.content in ("yes", "no")
    for entry in guided.choices[0].logprobs.content:  # masked tokens: -9999, not -inf
        assert all(-9999.0 <= top.logprob <= 0.0 for top in entry.top_logprobs)
        assert entry.logprob > -9999.0
    grammar = 'root ::= ("one" | "two") " " ("circle" | "square")'
    ebnf = client.chat.completions.create(
        **base, extra_body={"structured_outputs": {"grammar": grammar}}
    )
    assert re.fullmatch("(one|two) (circle|square)", ebnf.choices[0].message.content)
    obj = client.chat.completions.create(
        **{**base, "max_tokens": 60}, response_format={"type": "json_object"}
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # a free-form object may run out of tokens; what there is must be an object's start
        assert obj.choices[0].message.content.startswith("{")
    plain = client.completions.create(
        model=MODEL,
        prompt="The shape is",
        max_tokens=10,
        temperature=0,
        extra_body={"guided_choice": ["round"]},
    )
    assert plain.choices[0].text == "round"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "is required"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs.grammar"),
        ({"guided_json": "{not json"}, "not valid JSON"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "at most one output constraint"),
    ],
)
def test_bad_constraints_are_400s(server, body, fragment):
    import httpx

    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
