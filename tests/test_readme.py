"""README.md stays complete: every command-line flag of both services is in its configuration
reference, and every benchmark module under bench/ is in its benchmarks section."""

from __future__ import annotations

import argparse
import re

import pytest

from scripts.testkit.launch import REPO
from services.encode.__main__ import build_parser as encode_parser
from services.language.cli import build_parser as language_parser
from tests.readme import README, section

CONFIG = "## Configuration reference"


def documented_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string `--help` prints (hidden test hooks use argparse.SUPPRESS)."""
    return [
        flag
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
    ]


def mentioned(flag: str, text: str) -> bool:
    """`flag` in backticks, alone or with a metavar (`--model DIR`); a longer flag that starts
    with it (`--internal-token-file` for `--internal-token`) does not count."""
    return re.search(rf"`{re.escape(flag)}[` ]", text) is not None


@pytest.mark.parametrize(
    ("heading", "build"),
    [
        ("### `python -m services.encode`", encode_parser),
        ("### `python -m services.language`", language_parser),
    ],
)
def test_configuration_reference_lists_every_flag(heading, build):
    reference = section(section(README.read_text(), CONFIG), heading)
    flags = documented_flags(build())
    assert len(flags) > 20  # the parser was read, not an empty stand-in
    missing = [flag for flag in flags if not mentioned(flag, reference)]
    assert not missing, f"README.md {heading} lacks {missing}"


def test_hidden_hooks_stay_out_of_the_checked_flags():
    assert "--inject-step-faults" not in documented_flags(language_parser())


def test_benchmarks_section_lists_every_benchmark_module():
    text = section(README.read_text(), "## Benchmarks")
    bench = REPO / "bench"
    # Not benchmarks: the package and its helpers (launches.py counts for bench.decode,
    # gpu_timing.py, moe_tune.py and fp8_triton.py time and tune for bench.kernels_triton)
    shared = {
        "__init__.py",
        "common.py",
        "launches.py",
        "gpu_timing.py",
        "moe_tune.py",
        "fp8_triton.py",
    }
    modules = sorted(p.stem for p in bench.glob("*.py") if p.name not in shared)
    modules += sorted(p.name for p in bench.iterdir() if (p / "__main__.py").is_file())
    assert len(modules) >= 8
    missing = [m for m in modules if f"python -m bench.{m}" not in text]
    assert not missing, f"README.md ## Benchmarks has no command for {missing}"


def test_section_stops_at_the_next_heading_of_its_level_outside_code():
    text = "## A\none\n```bash\n# not a heading\n```\n### A.1\ntwo\n## B\nthree\n"
    assert section(text, "## A") == "one\n```bash\n# not a heading\n```\n### A.1\ntwo"
    with pytest.raises(ValueError, match="no heading"):
        section(text, "## C")
