"""Print the project's runtime requirements (pyproject.toml [project] dependencies), one a line.

    python deploy/requirements.py pyproject.toml > requirements.txt

The image build installs these in a layer of their own, before any code is copied, so that a code
change rebuilds only the small layers on top (see deploy/Dockerfile).
"""

from __future__ import annotations

import sys
import tomllib


def runtime_requirements(pyproject: str) -> list[str]:
    """The [project] dependencies of a pyproject.toml (no extras)."""
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


if __name__ == "__main__":
    print("\n".join(runtime_requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
