"""The import-linter contracts in pyproject.toml hold, and a module that breaks one is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "shared", "proto", "bench", "scripts", "tests")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_the_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The packages and pyproject.toml, copied (without the shipped model's weights)."""
    root = tmp_path_factory.mktemp("tree")
    for name in PACKAGES:
        shutil.copytree(
            REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors")
        )
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("shared/wire/probe.py", "import services.language.engine\n", "shared is the bottom layer"),
        (
            "services/encode/probe.py",
            "from services.language.engine import request\n",
            "the two services are independent",
        ),
        (
            "services/language/engine/probe.py",
            "import fastapi\n",
            "the engine knows nothing of the front ends",
        ),
        (
            "services/language/probe.py",
            "from proto.splitvl.encode.v1 import encode_pb2\n",
            "generated protobuf code only in the adapters",
        ),
        ("services/language/probe.py", "import tests.tiny\n", "the services never import tooling"),
    ],
    ids=["shared-up", "cross-service", "engine-http", "pb2-outside-adapter", "service-tests"],
)
def test_a_module_crossing_a_wall_breaks_its_contract(tree_copy, module, source, contract):
    probe = tree_copy / module
    probe.write_text(source)
    try:
        result = _lint(tree_copy)
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
