"""The README's examples, run against real services on the shipped small model.

One encode and one language service are started as `make serve` starts them (scripts.demo's
cluster, here on free ports); each example marked in README.md runs as written, with the
addresses of `make serve` (HTTP 8000, gRPC 8001) and /tmp/ rewritten to this cluster's and a
temporary folder, and what it prints must be what the README shows, `...` matching what varies.
Everything is greedy, so the answers are fixed for the shipped checkpoint.
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.demo import ClusterConfig, check_model_dir, running_cluster
from scripts.testkit.launch import REPO, ServiceError
from tests.readme import README, Example, examples

SHAPES_VL = REPO / "models" / "shapes-vl"
EXAMPLES = examples(README.read_text())
# Run before the others: it draws the picture they send.
SETUP = "red-image"
CHECKED = [name for name, example in EXAMPLES.items() if example.output is not None]
REQUIRED = {
    "curl-chat",
    "openai-stream",
    "structured-output",
    "tokenize",
    "models-health",
    "grpc-generate",
    "grpc-reflection",
    "load-test",
}
EXAMPLE_TIMEOUT_S = 120.0
# How the README's examples spell `make serve`'s addresses. Only text to rewrite: this test's
# services bind port 0 and the examples are pointed at the ports they got.
README_HTTP, README_GRPC = "127.0.0.1:8000", "127.0.0.1:8001"


@dataclass(frozen=True)
class Readme:
    """Runs README examples against one cluster, translating its addresses and /tmp/."""

    http: str  # the bound host:port standing in for README_HTTP
    grpc: str  # for README_GRPC
    tmp: Path  # for /tmp

    def _to_cluster(self) -> dict[str, str]:
        return {
            README_HTTP: self.http,
            README_GRPC: self.grpc,
            "/tmp/": f"{self.tmp}/",
            ".venv/bin/python": sys.executable,
        }

    def run(self, example: Example) -> str:
        """The example's standard output, in the README's terms (its addresses and /tmp/)."""
        code = _substitute(example.code, self._to_cluster())
        if example.language == "bash":
            command = ["bash", "-e", "-o", "pipefail", "-c", code]
        elif example.language == "python":
            command = [sys.executable, "-c", code]
        else:
            raise AssertionError(f"{example.name}: no runner for a {example.language!r} block")
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S
        )
        assert done.returncode == 0, f"{example.name} exited {done.returncode}:\n{done.stderr}"
        back = {new: old for old, new in self._to_cluster().items()}
        return _substitute(done.stdout, back)


def _substitute(text: str, replacements: dict[str, str]) -> str:
    """All replacements in one pass, so a replacement's text is never replaced again."""
    pattern = "|".join(re.escape(k) for k in sorted(replacements, key=len, reverse=True))
    return re.sub(pattern, lambda m: replacements[m.group(0)], text)


def _normalized(text: str) -> str:
    # Editors strip trailing spaces from README lines; the report pads its columns with them.
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def matches(want: str, got: str) -> bool:
    """doctest's rule: equal text, `...` in `want` standing for any text."""
    checker = doctest.OutputChecker()
    return checker.check_output(_normalized(want), _normalized(got), doctest.ELLIPSIS)


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> Iterator[Readme]:
    try:
        check_model_dir(SHAPES_VL)
    except ServiceError as exc:
        pytest.skip(f"the README's outputs are the shipped model's: {exc}")
    workdir = tmp_path_factory.mktemp("readme_services")
    tmp = tmp_path_factory.mktemp("readme_tmp")
    with running_cluster(ClusterConfig(SHAPES_VL, workdir, grpc_port=0)) as cluster:
        runner = Readme(cluster.base_url.removeprefix("http://"), cluster.grpc_address, tmp)
        runner.run(EXAMPLES[SETUP])
        yield runner


def test_the_readme_marks_every_documented_example():
    assert REQUIRED <= set(CHECKED), f"unmarked: {sorted(REQUIRED - set(CHECKED))}"
    assert EXAMPLES[SETUP].output is None


def test_the_output_check_allows_only_what_the_ellipsis_stands_for():
    assert matches('{"id": "chatcmpl-...", "n": 1}\n', '{"id": "chatcmpl-9f2", "n": 1}   \n')
    assert not matches('{"id": "chatcmpl-...", "n": 1}', '{"id": "chatcmpl-9f2", "n": 2}')
    assert not matches("red\n", "red\nred\n")


@pytest.mark.parametrize("name", CHECKED)
def test_example_prints_what_the_readme_shows(readme, name):
    example = EXAMPLES[name]
    got = readme.run(example)
    assert matches(example.output, got), (
        f"README example {name!r} printed:\n{got}\nthe README shows:\n{example.output}"
    )
