"""The language service's command line: sizes, engine and image-fetch settings."""

from __future__ import annotations

import json
import os

import pytest

from services.language.__main__ import (
    _announce,
    build_parser,
    engine_config,
    image_fetch_config,
)


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
    from services.language.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--dtype", "bf16"]).dtype == "bfloat16"
    assert parser.parse_args(["--model", "m"]).dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--dtype", "bogus"])


def test_missing_model_is_a_one_line_error(tmp_path, caplog):
    from services.language.__main__ import main

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
