"""Chat prompts: render the checkpoint's chat template, tokenize, expand image pads.

The template is rendered the way transformers' `apply_chat_template` renders it (same sandboxed
jinja environment, filters and globals, the tokenizer's special tokens as variables, `None`
fields dropped), so a prompt served here tokenizes exactly as the model saw prompts in
training. Each image part renders as `<|vision_start|><|image_pad|><|vision_end|>`; once the
encode service has returned the image's grid, its single pad becomes `t*h*w / merge**2` pads,
one per embedding row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.language.errors import BadRequestError
from services.language.frontend.pads import VideoMarkers
from shared.wire.images import EncodedImage, PendingImage

# Variables transformers passes to every template from the tokenizer (its `special_tokens_map`)
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Roles the Qwen chat templates render; "developer" is OpenAI's newer name for "system"
_ROLE_ALIASES = {"developer": "system"}
_IMAGE_ROLES = frozenset({"user", "tool"})


class ChatTemplateNotFoundError(FileNotFoundError):
    """The checkpoint directory has no chat template in any of the places transformers looks."""


@dataclass(frozen=True)
class TextPart:
    """A text content part."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image content part: a URL to load (`data:` or http(s)) or the raw encoded bytes."""

    url: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.data is None):
            raise ValueError("an image part needs exactly one of url or data")


@dataclass(frozen=True)
class VideoPart:
    """A video content part: a URL to load, the raw file bytes, or its frames (image files, in
    order, at `frames_fps` frames per second)."""

    url: str | None = None
    data: bytes | None = None
    frames: tuple[bytes, ...] = ()
    frames_fps: float | None = None

    def __post_init__(self) -> None:
        if sum((self.url is not None, self.data is not None, bool(self.frames))) != 1:
            raise ValueError("a video part needs exactly one of url, data or frames")
        if self.frames and not (self.frames_fps and self.frames_fps > 0):
            raise ValueError("a video given as frames needs a positive frames_fps")


ContentPart = TextPart | ImagePart | VideoPart
MediaPart = ImagePart | VideoPart


@dataclass(frozen=True)
class ChatMessage:
    """One chat message in the server's own form, independent of the HTTP or gRPC schema."""

    role: str
    content: str | tuple[ContentPart, ...] | None
    # Assistant calls in the history, as OpenAI sends them ({"id", "type", "function": {...}})
    tool_calls: tuple[Mapping[str, Any], ...] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's earlier thinking

    def media_parts(self) -> list[MediaPart]:
        """The message's image and video parts, in order."""
        if isinstance(self.content, tuple):
            return [part for part in self.content if isinstance(part, ImagePart | VideoPart)]
        return []


def _special_token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _template_from_config_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}], the default one is used
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default")
    return None


def load_chat_template_source(model_dir: str | Path) -> str:
    """The checkpoint's default chat template, looked up in transformers' order.

    `chat_template.jinja` takes priority over `tokenizer_config.json`'s `chat_template`, and the
    processor's legacy `chat_template.json` comes last.
    """
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        source = _template_from_config_value(_read_json(tokenizer_config).get("chat_template"))
        if source:
            return source
    processor_file = model_dir / "chat_template.json"
    if processor_file.is_file():
        source = _template_from_config_value(_read_json(processor_file).get("chat_template"))
        if source:
            return source
    raise ChatTemplateNotFoundError(
        f"no chat template in {model_dir}: expected chat_template.jinja, a 'chat_template' entry "
        "in tokenizer_config.json, or chat_template.json"
    )


def load_special_tokens(model_dir: str | Path) -> dict[str, str]:
    """The special-token strings (bos_token, eos_token, ...) the template may refer to."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = _read_json(path)
    tokens = {key: _special_token_text(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
    return {key: value for key, value in tokens.items() if value is not None}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the rendered prompt
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# Variables the server itself passes to the template; chat_template_kwargs may not set them
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclass(frozen=True)
class RenderOptions:
    """Per-request template inputs besides the messages: tools (OpenAI's dicts, rendered as
    sent) and extra variables (`chat_template_kwargs`, e.g. `enable_thinking`)."""

    tools: tuple[Mapping[str, Any], ...] | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, source: str | None = None) -> ChatTemplate:
        """Load the template and special tokens of a Hugging Face checkpoint directory;
        `source` replaces the checkpoint's template (`--chat-template`)."""
        if source is None:
            source = load_chat_template_source(model_dir)
        return cls(source, load_special_tokens(model_dir))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render plain message dicts; raises BadRequestError when the template rejects them."""
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        extra = {k: v for k, v in kwargs.items() if k not in RESERVED_TEMPLATE_VARIABLES}
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(
                messages=plain,
                tools=list(tools) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise BadRequestError(f"the chat template rejected the messages: {exc}") from exc


def message_to_template_dict(message: ChatMessage) -> dict[str, Any]:
    """The message in the dict form chat templates read (OpenAI-style content parts)."""
    role = _ROLE_ALIASES.get(message.role, message.role)
    item: dict[str, Any] = {"role": role, "content": message.content}
    if isinstance(message.content, tuple):
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                # Templates only test that an image or video key is present, never the URL
                parts.append({"type": "image" if isinstance(part, ImagePart) else "video"})
        item["content"] = parts
    extras = {
        "tool_calls": list(message.tool_calls) if message.tool_calls else None,
        "tool_call_id": message.tool_call_id,
        "name": message.name,
        "reasoning_content": message.reasoning_content,
    }
    item.update((key, value) for key, value in extras.items() if value is not None)
    return item


def collect_media(messages: Iterable[ChatMessage]) -> list[MediaPart]:
    """All image and video parts in prompt order; refuses them where the template would drop
    them."""
    media: list[MediaPart] = []
    for index, message in enumerate(messages):
        found = message.media_parts()
        if found and _ROLE_ALIASES.get(message.role, message.role) not in _IMAGE_ROLES:
            raise BadRequestError(
                f"messages[{index}] ({message.role}) has an image or video; they are accepted "
                "only in user and tool messages",
                param=f"messages[{index}].content",
            )
        media.extend(found)
    return media


def collect_images(messages: Iterable[ChatMessage]) -> list[ImagePart]:
    """The image parts in prompt order (see collect_media)."""
    return [part for part in collect_media(messages) if isinstance(part, ImagePart)]


class PromptBuilder:
    """Messages -> prompt token ids with one `<|image_pad|>` per image (expanded later)."""

    def __init__(
        self,
        template: ChatTemplate,
        encode: Callable[[str], Sequence[int]],
        image_token_id: int | None,
        video_token_id: int | None = None,
        video_markers: VideoMarkers | None = None,
    ) -> None:
        self.template = template
        self._encode = encode
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.video_markers = video_markers  # None: the model takes no video

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text."""
        return list(self._encode(text))

    def render(self, messages: Sequence[ChatMessage], options: RenderOptions | None = None) -> str:
        """The prompt text, ending with the assistant header (unless options say otherwise)."""
        options = options or RenderOptions()
        return self.template.render(
            [message_to_template_dict(m) for m in messages],
            add_generation_prompt=options.add_generation_prompt,
            tools=options.tools,
            **options.template_kwargs,
        )

    def tokenize(
        self, messages: Sequence[ChatMessage], options: RenderOptions | None = None
    ) -> list[int]:
        """Token ids of the rendered prompt; checks one pad per image part."""
        return self.tokenize_rendered(messages, self.render(messages, options))

    def tokenize_rendered(self, messages: Sequence[ChatMessage], text: str) -> list[int]:
        """Token ids of `text`, the messages' rendering; checks one pad per image or video."""
        media = collect_media(messages)
        num_videos = sum(isinstance(part, VideoPart) for part in media)
        counts = (
            ("image", self.image_token_id, len(media) - num_videos),
            ("video", self.video_token_id, num_videos),
        )
        token_ids = list(self._encode(text))
        for kind, pad, expected in counts:
            if expected and pad is None:
                what = "is text-only" if kind == "image" else "takes no video input"
                raise BadRequestError(f"this model {what}; remove the {kind} parts")
            found = token_ids.count(pad) if pad is not None else 0
            if found != expected:
                # Literal special-token text in a message would otherwise be taken as a slot
                raise BadRequestError(
                    f"the prompt has {found} {kind} placeholder tokens but {expected} {kind} "
                    f"parts; message text must not contain the {kind} placeholder token"
                )
        return token_ids


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for the engine: expanded token ids and the images' embeddings, or their
    placeholders and the plan that encodes them once the request is in the engine."""

    token_ids: tuple[int, ...]
    images: tuple[EncodedImage | PendingImage, ...] = ()
    grammar: Any = None  # structured_output.CompiledGrammar the answer must follow
    reasoning_open: bool = False  # the rendered prompt leaves <think> open
    media: Any = None  # media.MediaPlan of the placeholders, encoded after submission

    @property
    def num_image_tokens(self) -> int:
        """Prompt tokens that are image embeddings."""
        return sum(image.num_tokens for image in self.images)


@dataclass(frozen=True)
class ContextWindow:
    """The context length a request must fit: prompt plus generated tokens."""

    max_model_len: int

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """400 naming both numbers when the prompt leaves no room to generate."""
        if num_prompt_tokens >= self.max_model_len:
            raise BadRequestError(
                f"the prompt has {num_prompt_tokens} tokens, but this model's maximum context "
                f"length is {self.max_model_len} tokens; shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )

    def max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The request's max_tokens, or the room the context has left when it gave none."""
        self.check_prompt(num_prompt_tokens)
        room = self.max_model_len - num_prompt_tokens
        if requested is None:
            return room
        if requested > room:
            raise BadRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{num_prompt_tokens + requested} were requested ({num_prompt_tokens} in the "
                f"prompt, {requested} to generate); lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested
