"""OpenAI-compatible response bodies and server-sent events, built from engine outputs.

`ResponseBuilder` folds each choice's `RequestOutput`s into a chat or text-completion body (or
one stream event per output); `collect_response` and `stream_events` drive it from an engine
stream and close that stream however they end, which aborts an unfinished request. Chat choices
may run output parsers (reasoning, tool calls) that turn the text into `reasoning_content`,
`content` and `tool_calls`; a choice that called tools finishes with "tool_calls".
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.language.engine.request import RequestOutput, TokenLogprob
from services.language.errors import APIError, InternalServerError, ServiceUnavailableError
from services.language.parsers.chat_output import ChatOutputConfig, ChoiceDelta, ChoiceOutputParser

logger = logging.getLogger(__name__)

TokenText = Callable[[int], str]


# A token a grammar or a bias ruled out has logprob -inf, which JSON cannot carry; vLLM's value
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _token_entry(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    """OpenAI chat `logprobs` (`{"content": [...]}`)."""
    content = []
    for entry in entries:
        item = _token_entry(entry.token_id, entry.logprob, token_text)
        item["top_logprobs"] = [_token_entry(t, lp, token_text) for t, lp in entry.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_text: TokenText, text_offset: int = 0
) -> dict:
    """Legacy completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(entry.logprob))
        top.append({token_text(t): _finite(lp) for t, lp in entry.top})
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


@dataclass
class ChoiceState:
    """What has been produced so far for one choice."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    content: list[str] = field(default_factory=list)  # the answer, once parsers took their part
    reasoning: list[str] = field(default_factory=list)
    parser: ChoiceOutputParser | None = None


@dataclass(frozen=True)
class ResponseOptions:
    """What a response carries besides the text."""

    n: int = 1
    logprobs: bool = False
    include_usage: bool = False  # streams only: a closing usage chunk
    return_token_ids: bool = False  # vLLM's extension: token ids beside the text
    continuous_usage: bool = False  # streams with include_usage: usage on every chunk


class ResponseBuilder:
    """Turns engine outputs into OpenAI chat or text-completion bodies and stream events."""

    def __init__(
        self, kind: str, model: str, options: ResponseOptions, token_text: TokenText
    ) -> None:
        if kind not in ("chat", "text"):
            raise ValueError(f"kind must be 'chat' or 'text', got {kind!r}")
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.model = model
        self.options = options
        self.created = int(time.time())
        self.choices = [ChoiceState() for _ in range(options.n)]
        self.token_text = token_text
        self.prompt_token_ids: tuple[int, ...] = ()
        self.last_output: RequestOutput | None = None
        self.output_config = ChatOutputConfig()

    def configure_output(self, config: ChatOutputConfig) -> None:
        """Run `config`'s parsers on every choice (chat only; before the first output)."""
        self.output_config = config
        if self.kind == "chat" and config.active:
            for state in self.choices:
                state.parser = ChoiceOutputParser(config)

    def add(self, index: int, output: RequestOutput) -> ChoiceDelta:
        """Fold one output of choice `index` into the totals; returns what it adds."""
        state = self.choices[index]
        state.text.append(output.new_text)
        state.token_ids.extend(output.new_token_ids)
        state.logprobs.extend(output.logprobs or ())
        state.num_output_tokens = output.num_output_tokens
        if output.finished:
            state.finish_reason = output.finish_reason
        self.last_output = output
        delta = ChoiceDelta(output.new_text)
        if state.parser is not None:
            delta = state.parser.feed(output.new_text, len(output.new_token_ids))
            if output.finished:
                delta = delta + state.parser.finish()
        state.content.append(delta.content)
        state.reasoning.append(delta.reasoning)
        return delta

    def usage(self) -> dict:
        """OpenAI `usage`: prompt tokens (image tokens included) counted once; completion
        tokens count reasoning and answer alike."""
        out = self.last_output
        prompt = out.num_prompt_tokens if out else 0
        completion = sum(state.num_output_tokens for state in self.choices)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens if out else 0},
        }
        if self.output_config.reasoning:
            reasoning = sum(s.parser.num_reasoning_tokens for s in self.choices if s.parser)
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    @staticmethod
    def _finish_reason(state: ChoiceState, reason: str | None) -> str | None:
        if reason == "stop" and state.parser is not None and state.parser.tool_calls:
            return "tool_calls"
        return reason

    def _message(self, state: ChoiceState) -> dict:
        content = "".join(state.content)
        calls = state.parser.tool_calls if state.parser is not None else []
        message: dict = {"role": "assistant", "content": content or (None if calls else "")}
        if self.output_config.reasoning:
            message["reasoning_content"] = "".join(state.reasoning) or None
        if calls:
            message["tool_calls"] = [call.to_dict() for call in calls]
        return message

    @staticmethod
    def _delta(delta: ChoiceDelta) -> dict:
        body: dict = {}
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.content:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = [d.to_dict() for d in delta.tool_calls]
        return body

    def _logprobs(self, entries: Sequence[TokenLogprob] | None, offset: int = 0) -> dict | None:
        if not self.options.logprobs or entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(entries, self.token_text, offset)

    def _choice(self, index: int, body, token_ids, logprobs, reason, delta: bool) -> dict:
        key = "text" if self.kind == "text" else "delta" if delta else "message"
        choice = {"index": index, key: body}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self._finish_reason(self.choices[index], reason)
        if self.options.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def response(self) -> dict:
        """The whole (non-streamed) response body."""
        choices = [
            self._choice(
                i,
                "".join(state.text) if self.kind == "text" else self._message(state),
                state.token_ids,
                self._logprobs(state.logprobs),
                state.finish_reason,
                delta=False,
            )
            for i, state in enumerate(self.choices)
        ]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.options.return_token_ids:
            body["prompt_token_ids"] = list(self.prompt_token_ids)
        return body

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.options.include_usage:  # OpenAI sends usage: null on every chunk but the last
            if usage is None and self.options.continuous_usage:
                usage = self.usage()  # vLLM's continuous_usage_stats: the running totals
            body["usage"] = usage
        return sse(body)

    def role_events(self) -> list[str]:
        """A chat stream opens with the assistant role for each choice."""
        if self.kind != "chat":
            return []
        events = []
        for index in range(len(self.choices)):
            delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            events.append(self._chunk([choice]))
        return events

    def delta_event(self, index: int, output: RequestOutput) -> str | None:
        """The stream event of one output, or None when it carries nothing to send."""
        offset = sum(len(t) for t in self.choices[index].text)
        delta = self.add(index, output)
        if self.kind == "chat":
            # Text a parser holds back (a tag being written) is sent later, not as empty deltas
            carries = (
                not delta.is_empty()
                or (self.options.logprobs and output.logprobs)
                or (self.options.return_token_ids and output.new_token_ids)
            )
        else:
            carries = output.new_text or output.logprobs or output.new_token_ids
        if not (carries or output.finished):
            return None
        reason = output.finish_reason if output.finished else None
        logprobs = self._logprobs(output.logprobs, offset)
        body = output.new_text if self.kind == "text" else self._delta(delta)
        choice = self._choice(index, body, output.new_token_ids, logprobs, reason, delta=True)
        return self._chunk([choice])

    def usage_event(self) -> str:
        """The closing chunk of a stream with `include_usage`: no choices, the usage."""
        return self._chunk([], self.usage())


def sse(body: dict) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _aborted(builder: ResponseBuilder) -> bool:
    return any(state.finish_reason == "abort" for state in builder.choices)


async def collect_response(builder: ResponseBuilder, stream, first) -> dict:
    """The whole response body of a non-streamed request; closes the stream."""
    try:
        builder.add(*first)
        async for index, output in stream:
            builder.add(index, output)
    finally:
        await stream.aclose()
    if _aborted(builder):
        raise ServiceUnavailableError("the request was aborted by the server; retry")
    return builder.response()


async def stream_events(builder: ResponseBuilder, stream, first):
    """Server-sent events of a streamed request, ending with `data: [DONE]`."""
    # Runs inside the StreamingResponse; a client disconnect cancels it here, and the finally
    # closes the engine stream, which aborts the request and frees its KV blocks.
    try:
        for event in builder.role_events():
            yield event
        item = first
        while item is not None:
            event = builder.delta_event(*item)
            if _aborted(builder):
                raise ServiceUnavailableError("the request was aborted by the server")
            if event is not None:
                yield event
            item = await anext(stream, None)
        if builder.options.include_usage:
            yield builder.usage_event()
    except APIError as exc:
        yield sse(exc.to_dict())
    except Exception:
        logger.exception("stream failed")
        yield sse(InternalServerError("internal server error").to_dict())
    finally:
        await stream.aclose()
    yield SSE_DONE
