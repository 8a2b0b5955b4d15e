"""The chat and image command-line options of the language service."""

from __future__ import annotations

import pytest

from services.language.__main__ import build_parser, image_fetch_config
from services.language.cli_options import chat_template_source, frontend_options
from shared.model.config import ConfigError


def parse(*argv: str):
    return build_parser().parse_args(["--model", "m", *argv])


def test_chat_flags_parse_into_options(tmp_path):
    args = parse(
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "qwen3",
        "--limit-mm-per-prompt",
        '{"image": 2}',
        "--allowed-local-media-path",
        str(tmp_path),
    )
    options = frontend_options(args)
    assert options.tools.parser == "hermes" and options.tools.enable_auto_tool_choice
    assert options.reasoning_parser == "qwen3"
    assert options.images.max_images_per_prompt == 2
    assert image_fetch_config(args).allowed_local_media_path == str(tmp_path)
    assert parse("--limit-mm-per-prompt", "image=3").limit_mm_per_prompt == 3
    defaults = frontend_options(parse())
    assert defaults.reasoning_parser is None and defaults.tools.parser is None
    assert defaults.images.max_images_per_prompt is None


@pytest.mark.parametrize(
    "bad",
    [
        ["--limit-mm-per-prompt", '{"video": 1}'],
        ["--limit-mm-per-prompt", '{"image": -1}'],
        ["--limit-mm-per-prompt", "lots"],
        ["--tool-call-parser", "mistral"],
        ["--reasoning-parser", "deepseek"],
    ],
)
def test_bad_values_are_usage_errors(bad):
    with pytest.raises(SystemExit):
        parse(*bad)


def test_auto_tool_choice_needs_a_parser():
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        frontend_options(parse("--enable-auto-tool-choice"))


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0].content }}")
    assert chat_template_source(str(path)) == "{{ messages[0].content }}"
    assert chat_template_source("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert chat_template_source(None) is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        chat_template_source(str(tmp_path / "missing.jinja"))
