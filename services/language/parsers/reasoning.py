"""Reasoning parsers: split a model's thinking from its answer (`reasoning_content` / `content`).

Qwen3 (`--reasoning-parser qwen3`) thinks inside `<think>...</think>`. Thinking starts either in
the output (the model writes `<think>`) or in the prompt (thinking templates end the generation
prompt with `<think>\\n`, so the output opens mid-thought); it ends at `</think>`, and the
newlines the model writes after the tag are not part of the answer. A tag split across tokens is
held back until it is known to be one, so no partial tag ever reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("qwen3",)


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt leaves a `<think>` open: the output starts inside it."""
    start = prompt_text.rfind(THINK_START)
    return start >= 0 and prompt_text.find(THINK_END, start) < 0


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


@dataclass(frozen=True)
class ReasoningDelta:
    """What one piece of output adds to the reasoning and to the answer."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Streaming `<think>` splitter; `feed` text deltas, then `finish` once."""

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        # "start": not yet known whether the output opens with <think>
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buffer = ""

    @property
    def answer_started(self) -> bool:
        """Whether the answer has begun (tokens fed before it count as reasoning tokens)."""
        return self._state == "content"

    def feed(self, text: str) -> ReasoningDelta:
        """Split newly generated text."""
        self._buffer += text
        reasoning, content = [], []
        while True:
            progressed = self._step(reasoning, content)
            if not progressed:
                break
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _step(self, reasoning: list[str], content: list[str]) -> bool:
        buffer = self._buffer
        if self._state == "start":
            stripped = buffer.lstrip()
            if stripped.startswith(THINK_START):
                self._buffer = stripped[len(THINK_START) :]
                self._state = "reasoning"
                return True
            if not stripped or THINK_START.startswith(stripped):
                return False  # maybe the start of <think>: wait for more
            self._state = "content"
            return True
        if self._state == "reasoning":
            end = buffer.find(THINK_END)
            if end >= 0:
                reasoning.append(buffer[:end])
                self._buffer = buffer[end + len(THINK_END) :]
                self._state = "after"
                return True
            keep = _partial_suffix(buffer, THINK_END)
            reasoning.append(buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]
            return False
        if self._state == "after":
            stripped = buffer.lstrip()
            if not stripped:
                self._buffer = ""
                return False
            self._buffer = stripped
            self._state = "content"
            return True
        content.append(buffer)
        self._buffer = ""
        return False

    def finish(self) -> ReasoningDelta:
        """Release what was held back waiting for a tag that never completed."""
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return ReasoningDelta(reasoning=rest)
        if self._state == "after":
            return ReasoningDelta()
        self._state = "content"
        return ReasoningDelta(content=rest)


def reasoning_format(fmt: dict, prompt_open: bool) -> dict:
    """A structural-tag format that lets the model think before `fmt` applies: the grammar
    starts after `</think>\\n\\n`. Free thinking when the prompt opened it; otherwise an
    optional `<think>` block the model may write first."""
    think = {
        "type": "tag",
        "begin": "" if prompt_open else THINK_START,
        "content": {"type": "any_text"},
        "end": THINK_END,
    }
    separator = {"type": "const_string", "value": "\n\n"}
    block: dict = {"type": "sequence", "elements": [think, separator]}
    if not prompt_open:
        block = {"type": "optional", "content": block}
    return {"type": "sequence", "elements": [block, fmt]}
