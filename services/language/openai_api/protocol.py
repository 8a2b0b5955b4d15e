"""OpenAI-compatible request bodies (pydantic, at the HTTP edge only).

Requests are converted here into the server's own types (`ChatMessage`, `SamplingParams`,
`RenderOptions`); responses are built in `openai_responses`. Fields are handled in three ways:
the ones implemented; OpenAI fields that would change the output but are not implemented,
refused with a 400 naming them (see `openai_fields`); and fields OpenAI does not define, ignored
with one warning naming them, as vLLM does, so clients that send newer extensions keep working.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.language.engine.request import (
    INT32_MAX,
    SEED_MAX,
    SEED_MIN,
    InvalidRequestError,
    SamplingParams,
)
from services.language.errors import BadRequestError
from services.language.frontend.prompt import (
    RESERVED_TEMPLATE_VARIABLES,
    ChatMessage,
    ImagePart,
    RenderOptions,
    TextPart,
    VideoPart,
)
from services.language.openai_api.constraints import (
    Constraint,
    ResponseFormat,
    StructuredOutputsParam,
    request_constraint,
)
from services.language.openai_api.fields import check_fields, validate_tool_choice, validate_tools
from services.language.openai_api.responses import ResponseOptions

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# A logit_bias key: a token id in ASCII digits (str.isdigit would pass "²", which int() refuses)
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    # Unknown top-level fields are kept so they can be named in one warning
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


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


class VideoURL(_Model):
    """The `video_url` object of a video part."""

    url: str


class VideoURLContentPart(_Model):
    """`{"type": "video_url", "video_url": {"url": ...}}` (vLLM's form): a data:video/...
    URL, an http(s) URL where the server allows them, or a file:// URL under its media path."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPartParam = Annotated[
    TextContentPart | ImageURLContentPart | VideoURLContentPart, Field(discriminator="type")
]


class ChatMessageParam(_Model):
    """One message of a chat completion request."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPartParam] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # kept as sent: the template reads them
    reasoning_content: str | None = None


class StreamOptions(_Model):
    """`stream_options`: a closing usage chunk, or (vLLM) usage on every chunk as well."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and plain completions (vLLM's extensions included)."""

    model: str
    max_tokens: int | None = None  # >= 1: SamplingParams checks it, naming max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, le=INT32_MAX)  # the API checks it against --max-n
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted without effect (OpenAI bookkeeping, vLLM's backend choice)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    guided_decoding_backend: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request; `max_tokens` None is filled in later by the API."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_SEQUENCES:
            raise BadRequestError(
                f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", param="stop"
            )
        values: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0 if self.top_k == -1 else self.top_k,  # vLLM's -1 disables it too
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
            "logit_bias": self._logit_bias(),
        }
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except InvalidRequestError as exc:
            raise BadRequestError(str(exc), param=_field_of(str(exc))) from exc

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key.strip()):
                raise BadRequestError(
                    f"logit_bias keys must be token ids (strings of digits), got {key!r}",
                    param="logit_bias",
                )
            pairs.append((int(key), bias))
        return tuple(pairs)

    def response_options(self, logprobs: int | None) -> ResponseOptions:
        """What the response carries besides the text."""
        options = self.stream_options
        include_usage = self.stream and options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        return ResponseOptions(
            self.n, logprobs is not None, include_usage, self.return_token_ids, continuous
        )

    def constraint(self) -> Constraint | None:
        """The structured-output constraint this request sets, if any."""
        guided = {
            name: getattr(self, name)
            for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        }
        return request_constraint(self.response_format, self.structured_outputs, guided)

    def check_fields(self) -> list[str]:
        """400 for unsupported output-changing fields; returns the unknown ones."""
        return check_fields(self)


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
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None  # kept as sent: the template renders them
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    mm_processor_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # accepted; Qwen3 has no effort levels
    # OpenAI fields that change the output and are not implemented (refused when set)
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    web_search_options: Any = None
    modalities: list[str] | None = None
    verbosity: str | None = None

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """The engine's `logprobs`: None, or how many alternatives to return per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[ChatMessage]:
        """The messages in the server's own form."""
        return chat_messages(self.messages)

    def render_options(self) -> RenderOptions:
        """Tools and template variables, checked."""
        tools = validate_tools(self.tools)
        validate_tool_choice(self.tool_choice)
        return render_options(tools, self.chat_template_kwargs, self.add_generation_prompt)


def render_options(
    tools: list[dict[str, Any]] | None, kwargs: dict[str, Any] | None, add_generation_prompt: bool
) -> RenderOptions:
    """RenderOptions from request fields; 400 when chat_template_kwargs sets a reserved name."""
    kwargs = dict(kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(kwargs))
    if reserved:
        raise BadRequestError(
            f"chat_template_kwargs may not set {reserved}; use the request fields instead",
            param="chat_template_kwargs",
        )
    return RenderOptions(tuple(tools) if tools else None, kwargs, add_generation_prompt)


def chat_messages(messages: list[ChatMessageParam]) -> list[ChatMessage]:
    """Request messages in the server's own form."""
    return [_to_chat_message(i, m) for i, m in enumerate(messages)]


def _to_chat_message(index: int, message: ChatMessageParam) -> ChatMessage:
    extra = {
        "tool_calls": tuple(message.tool_calls) if message.tool_calls else None,
        "tool_call_id": message.tool_call_id,
        "name": message.name,
        "reasoning_content": message.reasoning_content,
    }
    if message.content is None:
        if message.role != "assistant":
            raise BadRequestError(
                f"messages[{index}].content is required for role {message.role!r}",
                param=f"messages[{index}].content",
            )
        return ChatMessage(message.role, None, **extra)
    if isinstance(message.content, str):
        return ChatMessage(message.role, message.content, **extra)
    return ChatMessage(message.role, tuple(map(_part, message.content)), **extra)


def _part(part: ContentPartParam) -> TextPart | ImagePart | VideoPart:
    if isinstance(part, TextContentPart):
        return TextPart(part.text)
    if isinstance(part, ImageURLContentPart):
        return ImagePart(url=part.image_url.url)
    return VideoPart(url=part.video_url.url)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions with one prompt (text or token ids)."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

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


class TokenizeCompletionRequest(_Request):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """POST /tokenize with messages, rendered as a chat request would be."""

    model: str | None = None
    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def render_options(self) -> RenderOptions:
        return render_options(
            validate_tools(self.tools), self.chat_template_kwargs, self.add_generation_prompt
        )


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
