"""One chat choice's generated text split into reasoning, answer and tool calls.

The reasoning parser runs first (thinking never holds tool calls), the tool-call parser on the
answer after it. Streamed and whole responses feed the same parsers token by token, so both
report the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.language.parsers.reasoning import ReasoningParser
from services.language.parsers.tool_calls import ToolCall, ToolCallDelta, ToolCallParser


@dataclass(frozen=True)
class ChatOutputConfig:
    """Which parsers a request's choices run."""

    reasoning: bool = False  # split <think>...</think> into reasoning_content
    reasoning_open: bool = False  # the prompt left <think> open: the output starts thinking
    tool_calls: bool = False  # parse <tool_call> blocks into tool_calls
    max_tool_calls: int | None = None  # 1 with parallel_tool_calls=false

    @property
    def active(self) -> bool:
        return self.reasoning or self.tool_calls


@dataclass(frozen=True)
class ChoiceDelta:
    """What one output adds to a choice's message."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __add__(self, other: ChoiceDelta) -> ChoiceDelta:
        return ChoiceDelta(
            self.content + other.content,
            self.reasoning + other.reasoning,
            self.tool_calls + other.tool_calls,
        )

    def is_empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


class ChoiceOutputParser:
    """Splits one choice's text deltas; counts the tokens spent reasoning."""

    def __init__(self, config: ChatOutputConfig) -> None:
        self.config = config
        self._reasoning = ReasoningParser(config.reasoning_open) if config.reasoning else None
        self._tools = ToolCallParser(config.max_tool_calls) if config.tool_calls else None
        self.num_reasoning_tokens = 0

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    def feed(self, text: str, num_tokens: int) -> ChoiceDelta:
        """Split the text of `num_tokens` new tokens."""
        reasoning = ""
        if self._reasoning is not None:
            split = self._reasoning.feed(text)
            reasoning, text = split.reasoning, split.content
            if not self._reasoning.answer_started:
                self.num_reasoning_tokens += num_tokens
        return self._answer(text, reasoning, final=False)

    def finish(self) -> ChoiceDelta:
        """Whatever the parsers held back, at the end of the choice."""
        reasoning, text = "", ""
        if self._reasoning is not None:
            split = self._reasoning.finish()
            reasoning, text = split.reasoning, split.content
        return self._answer(text, reasoning, final=True)

    def _answer(self, text: str, reasoning: str, final: bool) -> ChoiceDelta:
        if self._tools is None:
            return ChoiceDelta(text, reasoning)
        parsed = self._tools.feed(text)
        if final:
            tail = self._tools.finish()
            parsed_content = parsed.content + tail.content
            return ChoiceDelta(parsed_content, reasoning, parsed.deltas + tail.deltas)
        return ChoiceDelta(parsed.content, reasoning, parsed.deltas)
