"""The language service's chat and image command-line options: tool calls, reasoning, the chat
template, images per prompt and local image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.language.frontend import FrontendOptions
from services.language.image_policy import ImagePolicy
from services.language.reasoning import REASONING_PARSERS
from services.language.tool_calls import TOOL_CALL_PARSERS, ToolConfig
from shared.model.config import ConfigError


def add_chat_arguments(parser: argparse.ArgumentParser, images) -> None:
    """Add the options; `images` is the parser's images argument group."""
    images.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="serve file:// image URLs from inside DIR (off by default)",
    )
    images.add_argument(
        "--limit-mm-per-prompt",
        type=mm_limit_arg,
        default=None,
        metavar="JSON",
        help="most images per prompt, e.g. '{\"image\": 4}'",
    )
    chat = parser.add_argument_group("chat")
    chat.add_argument(
        "--chat-template",
        default=None,
        metavar="PATH",
        help="a Jinja chat template file to use instead of the checkpoint's",
    )
    chat.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="parse <tool_call> blocks of the output into tool_calls "
        "(qwen3 and hermes are the same format)",
    )
    chat.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    chat.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split <think>...</think> into reasoning_content",
    )


def mm_limit_arg(text: str) -> int:
    """'{"image": 4}' (vLLM's form) or 'image=4' -> 4."""
    try:
        value = json.loads(text)
    except ValueError:
        key, sep, number = text.partition("=")
        value = {key.strip(): number.strip()} if sep else None
    if not isinstance(value, dict) or "image" not in value or set(value) - {"image", "video"}:
        raise argparse.ArgumentTypeError(f'expected {{"image": N}}, got {text!r}')
    if value.get("video") not in (None, 0, "0"):
        raise argparse.ArgumentTypeError('videos are not supported; leave out "video"')
    try:
        limit = int(value["image"])
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"the image limit must be an integer: {text!r}") from None
    if limit < 0:
        raise argparse.ArgumentTypeError(f'expected {{"image": N}} with N >= 0, got {text!r}')
    return limit


def frontend_options(args: argparse.Namespace) -> FrontendOptions:
    """FrontendOptions from the command line (build_frontend adds the model's image processor)."""
    try:
        tools = ToolConfig(args.tool_call_parser, args.enable_auto_tool_choice)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    images = ImagePolicy(None, args.limit_mm_per_prompt)
    return FrontendOptions(args.reasoning_parser, tools, images)


def chat_template_source(value: str | None) -> str | None:
    """--chat-template: a file's text, or (as vLLM allows) the template itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file")
