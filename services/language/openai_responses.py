"""OpenAI-compatible response bodies and server-sent events, built from engine outputs.

`ResponseBuilder` folds each choice's `RequestOutput`s into a chat or text-completion body (or
one stream event per output); `collect_response` and `stream_events` drive it from an engine
stream and close that stream however they end, which aborts an unfinished request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.language.errors import APIError, InternalServerError, ServiceUnavailableError
from services.language.request import RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)

TokenText = Callable[[int], str]


def _token_entry(token_id: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


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
        token_logprobs.append(entry.logprob)
        top.append({token_text(t): lp for t, lp in entry.top})
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


@dataclass(frozen=True)
class ResponseOptions:
    """What a response carries besides the text."""

    n: int = 1
    logprobs: bool = False
    include_usage: bool = False  # streams only: a closing usage chunk
    return_token_ids: bool = False  # vLLM's extension: token ids beside the text


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

    def add(self, index: int, output: RequestOutput) -> None:
        """Fold one output of choice `index` into the totals."""
        state = self.choices[index]
        state.text.append(output.new_text)
        state.token_ids.extend(output.new_token_ids)
        state.logprobs.extend(output.logprobs or ())
        state.num_output_tokens = output.num_output_tokens
        if output.finished:
            state.finish_reason = output.finish_reason
        self.last_output = output

    def usage(self) -> dict:
        """OpenAI `usage`: prompt tokens (image tokens included) counted once."""
        out = self.last_output
        prompt = out.num_prompt_tokens if out else 0
        completion = sum(state.num_output_tokens for state in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens if out else 0},
        }

    def _logprobs(self, entries: Sequence[TokenLogprob] | None, offset: int = 0) -> dict | None:
        if not self.options.logprobs or entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(entries, self.token_text, offset)

    def _choice(self, index: int, text: str, token_ids, logprobs, reason, delta: bool) -> dict:
        if self.kind == "text":
            choice = {"index": index, "text": text}
        elif delta:
            choice = {"index": index, "delta": {"content": text} if text else {}}
        else:
            choice = {"index": index, "message": {"role": "assistant", "content": text}}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = reason
        if self.options.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def response(self) -> dict:
        """The whole (non-streamed) response body."""
        choices = [
            self._choice(i, "".join(state.text), state.token_ids,
                         self._logprobs(state.logprobs), state.finish_reason, delta=False)
            for i, state in enumerate(self.choices)
        ]  # fmt: skip
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip
        if self.options.return_token_ids:
            body["prompt_token_ids"] = list(self.prompt_token_ids)
        return body

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip
        if self.options.include_usage:  # OpenAI sends usage: null on every chunk but the last
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
        self.add(index, output)
        if not (output.new_text or output.finished or output.logprobs or output.new_token_ids):
            return None
        reason = output.finish_reason if output.finished else None
        logprobs = self._logprobs(output.logprobs, offset)
        choice = self._choice(
            index, output.new_text, output.new_token_ids, logprobs, reason, delta=True
        )
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
