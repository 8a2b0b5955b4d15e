"""docker-compose.yml parses and every service command is accepted by that service's CLI parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from services.encode.__main__ import build_parser as encode_parser
from services.language.__main__ import build_parser as language_parser

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"services.encode": encode_parser, "services.language": language_parser}


def _defaults(text: str) -> str:
    """Expand ${VAR:-default} to its default, as compose does with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_commands_parse():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    seen = set()
    for name, service in compose["services"].items():
        argv = shlex.split(_defaults(service["command"]))
        assert argv[:2] == ["python", "-m"], name
        module = argv[2]
        PARSERS[module]().parse_args(argv[3:])  # exits (SystemExit) on an unknown flag
        seen.add(module)
    assert seen == set(PARSERS)


def test_gpu_override_names_existing_services():
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())["services"]
    assert set(gpu) <= set(base)
