"""The import-linter contracts in pyproject.toml hold, a module that breaks one is caught, and the
module graph of services/ and shared/ has no cycle."""

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
        (
            "services/language/engine/probe.py",
            "import services.language.frontend.pipeline\n",
            "the language service's layers",
        ),
        (
            "services/language/parsers/probe.py",
            "import services.language.openai_api.protocol\n",
            "the language service's layers",
        ),
        (
            "shared/wire/probe.py",
            "import shared.model.config\n",
            "shared's layers: the model over the kernels and the wire contract",
        ),
    ],
    ids=[
        "shared-up",
        "cross-service",
        "engine-http",
        "pb2-outside-adapter",
        "service-tests",
        "engine-up",
        "parsers-up",
        "wire-up",
    ],
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


def _cycles(graph, prefixes: tuple[str, ...]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    modules = sorted(m for m in graph.modules if m.startswith(prefixes))
    edges = {
        m: [n for n in graph.find_modules_directly_imported_by(m) if n.startswith(prefixes)]
        for m in modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_the_modules_of_services_and_shared():
    import grimp

    graph = grimp.build_graph("services", "shared", cache_dir=None)
    assert _cycles(graph, ("services", "shared")) == []


def test_the_cycle_finder_finds_a_cycle():
    import grimp

    graph = grimp.ImportGraph()
    for module in ("services.a", "services.b", "services.c", "shared.d"):
        graph.add_module(module)
    graph.add_import(importer="services.a", imported="services.b")
    graph.add_import(importer="services.b", imported="services.c")
    graph.add_import(importer="services.c", imported="services.a")
    graph.add_import(importer="services.c", imported="shared.d")
    assert _cycles(graph, ("services", "shared")) == [["services.a", "services.b", "services.c"]]
