"""The tree's shape rules: ruff's lint and format, short modules, few top-level modules in the
language service, and formatter escapes only where a table truly reads better."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")
SOURCE_DIRS = ("services", "shared", "bench", "scripts", "deploy", "proto")
MAX_MODULE_LINES = 400
MAX_FMT_SKIPS = 20
MAX_LANGUAGE_TOP_LEVEL_MODULES = 8


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _sources() -> list[Path]:
    files = []
    for name in SOURCE_DIRS:
        files += [p for p in (REPO / name).rglob("*.py") if "_pb2" not in p.name]
    return files


def test_ruff_check_passes():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_check_passes():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_outside_tests_and_generated_code_is_long():
    long = {
        str(p.relative_to(REPO)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_formatter_escapes_are_rare():
    files = _sources() + list((REPO / "tests").rglob("*.py"))
    skips = sum(
        p.read_text().count("# fmt: skip") + p.read_text().count("# fmt: off") for p in files
    )
    assert skips <= MAX_FMT_SKIPS


def test_the_language_service_is_packages_not_a_flat_folder():
    top = sorted(p.name for p in (REPO / "services" / "language").glob("*.py"))
    assert len(top) <= MAX_LANGUAGE_TOP_LEVEL_MODULES, top
