"""Tool calling through the HTTP API on the shapes model, with the openai client: forced calls
(`required`, a named function) come out valid, streamed deltas reassemble to the same call,
`auto` parses, and a follow-up turn with the tool's result renders as transformers renders it."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from services.language.frontend.pipeline import FrontendOptions
from services.language.parsers.tool_calls import ToolConfig
from tests.language.serving import SHAPES_VL, chat_server

MODEL = "shapes-vl"
LOOKUP = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "filled": {"type": "boolean"},
    },
    "required": ["shape", "filled"],
}
COUNT = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "description": "Look a shape up.", "parameters": LOOKUP},
    },
    {"type": "function", "function": {"name": "count_shapes", "parameters": COUNT}},
]
SCHEMAS = {"lookup": LOOKUP, "count_shapes": COUNT}
QUESTION = [{"role": "user", "content": "How many shapes are there?"}]


@pytest.fixture(scope="module")
def server():
    options = FrontendOptions(tools=ToolConfig("qwen3", enable_auto_tool_choice=True))
    with chat_server(SHAPES_VL, options=options) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    )


def streamed_calls(stream) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    reason = None
    for chunk in stream:
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for delta in choice.delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"arguments": ""})
                if delta.id is not None:
                    assert "id" not in entry and delta.type == "function"
                    entry.update(id=delta.id, name=delta.function.name)
                entry["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "count_shapes"}}]
)
def test_forced_calls_are_valid_and_stream_the_same(client, choice):
    base = dict(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=300,
        temperature=0,
        parallel_tool_calls=False,
    )
    whole = client.chat.completions.create(**base)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1 and not message.content
    call = message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "count_shapes"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, reason = streamed_calls(client.chat.completions.create(**base, stream=True))
    assert reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (call.function.name, call.function.arguments)
    ]


def test_sampled_required_calls_follow_their_schemas(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=400,
        temperature=1.0,
        seed=5,
        n=2,
    )
    for choice in response.choices:
        assert choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_auto_leaves_a_plain_answer_as_content(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=20, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_follow_up_turn_renders_like_transformers(client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=0,
        parallel_tool_calls=False,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"result": 2}'},
        {"role": "tool", "tool_call_id": call.id, "content": "second"},
    ]
    follow = client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=TOOLS,
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    hf = PreTrainedTokenizerFast.from_pretrained(SHAPES_VL)
    text = hf.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and '<tool_response>\n{"result": 2}\n</tool_response>' in text
    assert f'<tool_call>\n{{"name": "{call.function.name}", "arguments": ' in text
    expected = hf.apply_chat_template(
        history, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert follow.model_extra["prompt_token_ids"] == list(expected)
