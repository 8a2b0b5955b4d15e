"""The language service's command line: sizes, engine and image-fetch settings, chat options."""

from __future__ import annotations

import json
import os

import pytest

from services.common.errors import ConfigError
from services.language.cli import (
    build_parser,
    chat_template_source,
    frontend_options,
    image_fetch_config,
)
from services.language.engine_flags import engine_config
from services.language.server import _announce


def test_sizes_and_settings_parse_into_configs(tmp_path):
    args = build_parser().parse_args(
        [
            "--model",
            str(tmp_path),
            "--kv-cache-memory",
            "1.5G",
            "--max-image-bytes",
            "512KiB",
            "--allowed-image-networks",
            "10.0.0.0/8, 192.168.0.0/16",
            "--dtype",
            "bfloat16",
        ]
    )
    assert args.max_request_bytes == 64 << 20  # the default, parsed by the same function
    engine = engine_config(args)
    assert (engine.kv_cache_memory, engine.dtype) == (3 << 29, "bfloat16")
    fetch = image_fetch_config(args)
    assert fetch.max_image_bytes == 512 << 10
    assert fetch.allowed_networks == ("10.0.0.0/8", "192.168.0.0/16")


def test_a_bad_size_is_a_usage_error_naming_the_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--model", str(tmp_path), "--kv-cache-memory", "lots"])
    assert exc.value.code == 2
    assert "512MiB" in capsys.readouterr().err


def test_announce_writes_the_ports_and_pid_atomically(tmp_path):
    port_file = tmp_path / "language.json"
    _announce(port_file, 8123, None)
    assert json.loads(port_file.read_text()) == {
        "http_port": 8123,
        "grpc_port": None,
        "pid": os.getpid(),
    }
    assert list(tmp_path.iterdir()) == [port_file]  # the temporary file was renamed over it


def test_dtype_aliases_and_errors():
    from services.language.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--dtype", "bf16"]).dtype == "bfloat16"
    assert parser.parse_args(["--model", "m"]).dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--dtype", "bogus"])


def test_quantization_reaches_the_engine_config(tmp_path, tiny_vl_dir):
    from dataclasses import replace

    from services.language.engine import EngineConfig, EngineConfigError
    from shared.model.config import Fp8Config, load_config

    parser = build_parser()
    args = parser.parse_args(["--model", str(tmp_path), "--quantization", "fp8"])
    engine = engine_config(args)
    assert engine.quantization == "fp8"
    assert engine_config(parser.parse_args(["--model", "m"])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--quantization", "int4"])
    with pytest.raises(EngineConfigError, match="--quantization"):
        EngineConfig(quantization="awq")
    # How the weights are held: the flag's, else the checkpoint's
    float_config = load_config(tiny_vl_dir)
    fp8_config = replace(float_config, quantization=Fp8Config())
    assert EngineConfig().weights_quantization(float_config) is None
    assert EngineConfig().weights_quantization(fp8_config) == "fp8"
    assert engine.weights_quantization(float_config) == "fp8"


def test_missing_model_is_a_one_line_error(tmp_path, caplog):
    from services.language.server import main

    assert main(["--model", str(tmp_path / "absent"), "--port", "0"]) == 1
    assert "cannot start the language service" in caplog.text


def test_reliability_flags_reach_the_engine_config_and_the_hook_stays_hidden(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(
        [
            "--model",
            str(tmp_path),
            "--max-queue-delay",
            "1.5",
            "--drain-timeout",
            "7",
            "--inject-step-faults",
            "3,9",
        ]
    )
    engine = engine_config(args)
    assert (engine.max_queue_delay_s, engine.fault_steps) == (1.5, (3, 9))
    assert args.drain_timeout == 7.0
    defaults = engine_config(parser.parse_args(["--model", str(tmp_path)]))
    assert (defaults.max_queue_delay_s, defaults.fault_steps) == (None, ())
    assert parser.parse_args(["--model", str(tmp_path)]).drain_timeout == 30.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--max-queue-delay" in shown and "--drain-timeout" in shown
    assert "--inject-step-faults" not in shown  # a test hook, not a setting


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
    assert parse("--limit-mm-per-prompt", "image=3").limit_mm_per_prompt == {"image": 3}
    both = parse("--limit-mm-per-prompt", '{"image": 2, "video": 1}')
    assert frontend_options(both).videos.max_videos_per_prompt == 1
    defaults = frontend_options(parse())
    assert defaults.reasoning_parser is None and defaults.tools.parser is None
    assert defaults.images.max_images_per_prompt is None


@pytest.mark.parametrize(
    "bad",
    [
        ["--limit-mm-per-prompt", '{"audio": 1}'],
        ["--limit-mm-per-prompt", '{"video": "many"}'],
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
