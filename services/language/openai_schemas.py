"""OpenAI-compatible request bodies (pydantic, at the HTTP edge only).

Requests are converted here into the server's own types (`ChatMessage`, `SamplingParams`);
responses are built in `openai_responses`. Unknown request fields are ignored, as
OpenAI-compatible servers commonly do, so clients that send newer fields keep working.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.language.errors import BadRequestError
from services.language.openai_responses import ResponseOptions
from services.language.prompt import ChatMessage, ImagePart, TextPart
from services.language.request import InvalidRequestError, SamplingParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContentPart(_Model):
    """`{"type": "text", "text": ...}`."""

    type: Literal["text"]
    text: str


class ImageURL(_Model):
    """The `image_url` object of an image part."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLContentPart(_Model):
    """`{"type": "image_url", "image_url": {"url": ...}}`."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPartParam = Annotated[TextContentPart | ImageURLContentPart, Field(discriminator="type")]


class ChatMessageParam(_Model):
    """One message of a chat completion request."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPartParam] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class StreamOptions(_Model):
    """`stream_options`; only `include_usage` has an effect."""

    include_usage: bool = False


class _SamplingFields(_Model):
    """Sampling fields shared by chat and plain completions (vLLM's extensions included)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request; `max_tokens` None is filled in later by the API."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        values: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "max_tokens": max_tokens,
            "stop": stop,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
        }
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except InvalidRequestError as exc:
            raise BadRequestError(str(exc), param=_field_of(str(exc))) from exc

    def response_options(self, logprobs: int | None) -> ResponseOptions:
        """What the response carries besides the text."""
        usage = self.stream_options is not None and self.stream_options.include_usage
        include_usage = self.stream and usage
        return ResponseOptions(self.n, logprobs is not None, include_usage, self.return_token_ids)


def _field_of(message: str) -> str | None:
    # SamplingParams messages start with the field name ("top_p must be ..."); name it as param
    first = message.split(" ", 1)[0]
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return first if first in names else None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """The engine's `logprobs`: None, or how many alternatives to return per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        # The range is SamplingParams' to check
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[ChatMessage]:
        """The messages in the server's own form."""
        return [_to_chat_message(i, m) for i, m in enumerate(self.messages)]


def _to_chat_message(index: int, message: ChatMessageParam) -> ChatMessage:
    if message.content is None:
        if message.role != "assistant":
            raise BadRequestError(
                f"messages[{index}].content is required for role {message.role!r}",
                param=f"messages[{index}].content",
            )
        return ChatMessage(message.role, None)
    if isinstance(message.content, str):
        return ChatMessage(message.role, message.content)
    parts = tuple(
        TextPart(p.text) if isinstance(p, TextContentPart) else ImagePart(url=p.image_url.url)
        for p in message.content
    )
    return ChatMessage(message.role, parts)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions with one prompt (text or token ids)."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt; batches of prompts are refused with a clear message."""
        if self.echo:
            raise BadRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequestError(
                    "only one prompt per request is supported; send one request per prompt",
                    param="prompt",
                )
            prompt = prompt[0]
        if not prompt:
            raise BadRequestError("prompt must not be empty", param="prompt")
        return prompt

    def logprobs_count(self) -> int | None:
        """The engine's `logprobs` for the legacy integer field."""
        return self.logprobs
