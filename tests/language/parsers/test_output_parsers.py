"""Reasoning and tool-call parsers over token streams: tags split across tokens, several calls,
text around them, broken calls; a stream split any way gives the same result as the whole."""

from __future__ import annotations

import json

import pytest

from services.language.errors import BadRequestError
from services.language.parsers.chat_output import ChatOutputConfig, ChoiceOutputParser
from services.language.parsers.reasoning import ReasoningParser, prompt_opens_reasoning
from services.language.parsers.tool_calls import ToolCallParser, ToolConfig, plan_tools

CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}'
    "\n</tool_call>"
)


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def run_tools(chunks: list[str], max_calls=None):
    parser = ToolCallParser(max_calls)
    content, deltas = [], []
    for chunk in chunks:
        out = parser.feed(chunk)
        content.append(out.content)
        deltas.extend(out.deltas)
    tail = parser.finish()
    content.append(tail.content)
    deltas.extend(tail.deltas)
    return "".join(content), deltas, parser.calls


def reassemble(deltas) -> list[dict]:
    calls: dict[int, dict] = {}
    for delta in deltas:
        entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
        if delta.id is not None:
            assert entry["id"] is None, "id sent twice"
            entry["id"], entry["name"] = delta.id, delta.name
        else:
            assert entry["id"] is not None, "arguments before the call's first delta"
        entry["arguments"] += delta.arguments
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 1000])
def test_one_call_split_anywhere(size):
    text = "Let me check.\n" + CALL
    content, deltas, calls = run_tools(pieces(text, size))
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2]})
    ]
    assembled = reassemble(deltas)
    assert assembled == [
        {"id": calls[0].id, "name": "get_weather", "arguments": calls[0].arguments}
    ]
    assert deltas[0].id is not None and deltas[0].arguments == ""  # first: id, type, name


def test_tag_split_over_tokens_like_a_byte_level_tokenizer():
    tokens = [
        "<",
        "tool",
        "_",
        "call",
        ">\n",
        '{"',
        "name",
        '":',
        ' "',
        "f",
        '", "',
        "arguments",
        '": {',
        '"x',
        '": ',
        "1",
        "}}",
        "\n</",
        "tool_call",
        ">",
    ]
    content, deltas, calls = run_tools(tokens)
    assert content == "" and calls[0].name == "f" and calls[0].arguments == '{"x": 1}'
    assert "".join(d.arguments for d in deltas) == '{"x": 1}'


def test_several_calls_and_text_between():
    text = CALL + "\n" + CALL.replace("Paris", "Rome") + "\n"
    for size in (1, 4, 1000):
        content, deltas, calls = run_tools(pieces(text, size))
        assert content == ""
        assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]
        assert [d.index for d in deltas if d.id] == [0, 1]
        assert len({c.id for c in calls}) == 2


def test_only_the_first_call_without_parallel_calls():
    content, deltas, calls = run_tools(pieces(CALL + "\n" + CALL, 3), max_calls=1)
    assert len(calls) == 1 and {d.index for d in deltas} == {0}


def test_text_without_calls_is_content_verbatim():
    text = "A red circle. <tool> is not a tag; neither is <tool_cal"
    for size in (1, 5, 1000):
        content, deltas, calls = run_tools(pieces(text, size))
        assert content == text and deltas == [] and calls == []


def test_broken_call_is_returned_as_text():
    text = "<tool_call>\nnot json at all\n</tool_call>"
    content, deltas, calls = run_tools(pieces(text, 4))
    assert content == text and calls == []


def test_call_in_other_key_order_is_sent_whole_at_its_end():
    text = '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>'
    content, deltas, calls = run_tools(pieces(text, 3))
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}
    assert len(deltas) == 1 and deltas[0].name == "f"


def test_call_cut_before_its_end_tag_keeps_what_was_streamed():
    text = CALL[: CALL.index("\n</tool_call>")]
    content, deltas, calls = run_tools(pieces(text, 2))
    assert calls and json.loads(calls[0].arguments) == {"city": "Paris", "days": [1, 2]}


@pytest.mark.parametrize("size", [1, 2, 3, 1000])
def test_reasoning_in_the_output(size):
    text = "<think>\nThe circle is red.\n</think>\n\nred"
    parser = ReasoningParser()
    out = [parser.feed(p) for p in pieces(text, size)] + [parser.finish()]
    assert "".join(o.reasoning for o in out) == "\nThe circle is red.\n"
    assert "".join(o.content for o in out) == "red"


def test_reasoning_opened_by_the_prompt():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    parser = ReasoningParser(starts_in_reasoning=True)
    out = [parser.feed(p) for p in ["I see a ", "red shape.</th", "ink>", "\n\n", "red"]]
    assert "".join(o.reasoning for o in out) == "I see a red shape."
    assert "".join(o.content for o in out) + parser.finish().content == "red"


def test_unfinished_reasoning_and_no_reasoning():
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.feed("still thinking </thi").reasoning == "still thinking "
    assert parser.finish().reasoning == "</thi"
    plain = ReasoningParser()
    out = [plain.feed(p) for p in ["<", "b>bold", " text"]] + [plain.finish()]
    assert "".join(o.content for o in out) == "<b>bold text"
    assert "".join(o.reasoning for o in out) == ""


def test_choice_parser_counts_reasoning_tokens_and_finds_calls_after_thinking():
    config = ChatOutputConfig(reasoning=True, reasoning_open=True, tool_calls=True)
    parser = ChoiceOutputParser(config)
    tokens = ["Need", " weather", ".", "</think>", "\n\n"] + pieces(CALL, 6)
    deltas = [parser.feed(t, 1) for t in tokens] + [parser.finish()]
    assert "".join(d.reasoning for d in deltas) == "Need weather."
    assert "".join(d.content for d in deltas) == ""
    assert parser.num_reasoning_tokens == 5
    assert [c.name for c in parser.tool_calls] == ["get_weather"]


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_tool_choice_rules():
    auto = ToolConfig("qwen3", True)
    assert plan_tools(TOOLS, None, True, auto).parse  # tools without a choice: auto
    assert not plan_tools(TOOLS, "none", True, auto).parse
    with pytest.raises(BadRequestError, match="enable-auto-tool-choice"):
        plan_tools(TOOLS, "auto", True, ToolConfig())
    required = plan_tools(TOOLS, "required", False, ToolConfig())
    assert required.parse and required.forced_format["stop_after_first"] is True
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "f"}}, True, ToolConfig())
    assert named.forced_format["type"] == "tag" and named.max_calls == 1
    with pytest.raises(BadRequestError, match="not among the tools"):
        plan_tools(TOOLS, {"type": "function", "function": {"name": "g"}}, True, ToolConfig())
    with pytest.raises(BadRequestError, match="needs tools"):
        plan_tools(None, "required", True, ToolConfig())
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ToolConfig(None, True)
