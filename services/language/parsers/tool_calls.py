"""Tool calls in Qwen3's (Hermes) format: parsing them out of the output, and the grammar that
forces them.

The model writes each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
`ToolCallParser` reads text deltas and returns the answer text outside the calls plus OpenAI
tool-call deltas: the first delta of a call carries its id, type and function name, later ones
pieces of `function.arguments`, streamed as the model writes them. A tag split across tokens is
held back until it is known to be one. The arguments are the model's own JSON text, verbatim, so
a streamed call reassembles to exactly the call a non-streamed response reports.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.language.errors import BadRequestError

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_CALL_PARSERS = ("qwen3", "hermes")
_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call: OpenAI's `{"id", "type": "function", "function": {...}}`."""

    id: str
    name: str
    arguments: str  # JSON text

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call `index`: id and name on its first delta, argument text after."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class _JSONValueScanner:
    """Finds where one JSON value ends in a stream of characters (strings and nesting aware)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.done = False
        self._started = self._in_string = self._escape = self._scalar = False
        self._depth = 0

    def feed(self, chars: str) -> str:
        """The characters that belong to the value; the rest, once it is complete, are not."""
        taken = []
        for ch in chars:
            if self.done:
                break
            if not self._started:
                if ch.isspace():
                    continue
                self._started = True
                if ch in "{[":
                    self._depth = 1
                elif ch == '"':
                    self._in_string = True
                else:
                    self._scalar = True
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                    self.done = self._depth == 0
            elif self._scalar:
                if ch in ",}] \t\r\n":
                    self.done = True
                    break
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                self.done = self._depth == 0
            taken.append(ch)
        self.text.extend(taken)
        return "".join(taken)


@dataclass
class _OpenCall:
    index: int
    body: str = ""  # the text after <tool_call> so far
    id: str | None = None  # set once the name has been sent
    scanner: _JSONValueScanner = field(default_factory=_JSONValueScanner)
    args_start: int = -1  # offset of the arguments value in `body`
    args_fed: int = 0  # how much of body[args_start:] the scanner has seen


@dataclass(frozen=True)
class ToolParse:
    """What one piece of output adds: answer text and tool-call deltas."""

    content: str = ""
    deltas: tuple[ToolCallDelta, ...] = ()


class ToolCallParser:
    """Streaming Hermes / Qwen3 tool-call parser; `feed` text deltas, then `finish` once."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls: list[ToolCall] = []
        self._max_calls = max_calls  # parallel_tool_calls=false keeps the first call only
        self._buffer = ""
        self._held_space = ""  # trailing whitespace, sent only if more answer text follows
        self._call: _OpenCall | None = None
        self._num_started = 0

    def feed(self, text: str) -> ToolParse:
        """Parse newly generated text."""
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(content, deltas):
            pass
        return ToolParse(self._answer("".join(content)), tuple(deltas))

    def _answer(self, text: str) -> str:
        # Whitespace between and after calls is layout, not answer
        text = self._held_space + text
        stripped = text.rstrip()
        self._held_space = text[len(stripped) :]
        return stripped

    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        if self._call is None:
            start = self._buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _partial_suffix(self._buffer, TOOL_CALL_START)
                content.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return False
            content.append(self._buffer[:start])
            self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
            self._call = _OpenCall(self._num_started)
            self._num_started += 1
            return True
        call = self._call
        end = self._buffer.find(TOOL_CALL_END)
        piece = self._buffer if end < 0 else self._buffer[:end]
        if end < 0:  # hold back what may be the start of the end tag
            piece = piece[: len(piece) - _partial_suffix(piece, TOOL_CALL_END)]
        call.body += piece
        self._buffer = self._buffer[len(piece) :]
        self._stream_call(call, deltas)
        if end < 0:
            return False
        self._buffer = self._buffer[len(TOOL_CALL_END) :]
        self._close_call(call, deltas, content)
        return True

    def _wanted(self, call: _OpenCall) -> bool:
        return self._max_calls is None or call.index < self._max_calls

    def _stream_call(self, call: _OpenCall, deltas: list[ToolCallDelta]) -> None:
        if not self._wanted(call):
            return
        if call.id is None:
            match = _NAME.match(call.body)
            if match is None:
                return
            call.id, call.args_start = new_call_id(), match.end()
            name = _json_string(match.group(1))
            deltas.append(ToolCallDelta(call.index, "", call.id, name))
        fresh = call.body[call.args_start + call.args_fed :]
        call.args_fed += len(fresh)
        piece = call.scanner.feed(fresh)
        if piece:
            deltas.append(ToolCallDelta(call.index, piece))

    def _close_call(self, call: _OpenCall, deltas: list[ToolCallDelta], content: list[str]) -> None:
        self._call = None
        parsed = _parse_call(call.body)
        if not self._wanted(call):
            return
        if call.id is not None:
            arguments = "".join(call.scanner.text)
            name = parsed[0] if parsed else _json_string(_NAME.match(call.body).group(1))
            self.calls.append(ToolCall(call.id, name, arguments))
        elif parsed is not None:  # a call not in the usual key order: sent whole at its end
            name, arguments = parsed
            call_id = new_call_id()
            deltas.append(ToolCallDelta(call.index, arguments, call_id, name))
            self.calls.append(ToolCall(call_id, name, arguments))
        else:  # not a call after all: it was answer text
            content.append(f"{TOOL_CALL_START}{call.body}{TOOL_CALL_END}")

    def finish(self) -> ToolParse:
        """Settle an unterminated call and release held-back text."""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._call is not None:
            call = self._call
            call.body += self._buffer
            self._buffer = ""
            self._stream_call(call, deltas)
            if call.id is not None or _parse_call(call.body) is not None:
                self._close_call(call, deltas, content)
            else:
                self._call = None
                content.append(TOOL_CALL_START + call.body)
        content.append(self._buffer)
        self._buffer = ""
        text = self._held_space + "".join(content)
        self._held_space = ""
        return ToolParse(text if not self.calls else text.rstrip(), tuple(deltas))


def _json_string(escaped: str) -> str:
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:  # an invalid escape: keep the model's text
        return escaped


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a call body, or None if it is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return value["name"], arguments
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def tool_call_format(
    tools: list[dict[str, Any]], name: str | None, parallel: bool
) -> dict[str, Any]:
    """The structural-tag format that forces calls in the model's own format: of tool `name`
    (one call), or with `name` None of any of `tools` (one or more calls; one if not parallel)."""
    tags = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        begin = f'{TOOL_CALL_START}\n{{"name": {json.dumps(function["name"], ensure_ascii=False)}'
        tags.append(
            {
                "type": "tag",
                "begin": f'{begin}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": parameters},
                "end": f"}}\n{TOOL_CALL_END}",
            }
        )
    if name is not None:
        return tags[0]
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": not parallel,
    }


@dataclass(frozen=True)
class ToolConfig:
    """The server's tool settings (`--tool-call-parser`, `--enable-auto-tool-choice`)."""

    parser: str | None = None
    enable_auto_tool_choice: bool = False

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool call parser {self.parser!r} is not one of {TOOL_CALL_PARSERS}")
        if self.enable_auto_tool_choice and self.parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools: parse the output for calls, and force them or not."""

    parse: bool = False
    forced_format: dict[str, Any] | None = None  # a grammar that makes the model call
    max_calls: int | None = None


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel: bool,
    config: ToolConfig,
) -> ToolPlan:
    """Resolve `tool_choice` as vLLM does; BadRequestError for a choice that cannot be served."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise BadRequestError(
                "tool_choice needs tools; send the tools it may call", param="tool_choice"
            )
        return ToolPlan()
    choice = "auto" if tool_choice is None else tool_choice
    max_calls = None if parallel else 1
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        if not config.enable_auto_tool_choice:
            raise BadRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                'to be set; send tool_choice "none", "required" or a named function instead',
                param="tool_choice",
            )
        return ToolPlan(parse=True, max_calls=max_calls)
    if choice == "required":
        return ToolPlan(True, tool_call_format(tools, None, parallel), max_calls)
    name = choice["function"]["name"]
    if name not in {tool["function"]["name"] for tool in tools}:
        raise BadRequestError(
            f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
        )
    return ToolPlan(True, tool_call_format(tools, name, parallel), 1)
