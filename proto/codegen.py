"""Generates the Python gRPC modules for every .proto file under proto/.

Run it with `make proto` (or `python -m proto.codegen`). The generated `*_pb2.py` and
`*_pb2_grpc.py` files are committed, so running the services needs no grpcio-tools;
tests/encode/test_proto_codegen.py regenerates into a temporary folder and fails when the committed
files are stale.

Files are compiled with the repository root as the include path, so a file at
proto/splitvl/encode/v1/encode.proto becomes the module proto.splitvl.encode.v1.encode_pb2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


class CodegenError(RuntimeError):
    """protoc failed or is not installed."""


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every .proto file under <root>/proto, relative to root, in a stable order."""
    return sorted(p.relative_to(root) for p in (root / "proto").rglob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    """Every generated module under <root>/proto, relative to root, in a stable order."""
    found = [p for p in (root / "proto").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    return sorted(p.relative_to(root) for p in found)


def generate(out_root: Path, src_root: Path = REPO_ROOT) -> list[Path]:
    """Compiles every .proto under src_root/proto into out_root (mirroring paths).

    Returns the generated files relative to out_root. Adds a missing __init__.py to each package
    folder of out_root/proto that holds generated code, so the modules import as packages.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # grpcio-tools is a dev dependency only
        raise CodegenError("grpcio-tools is not installed: pip install -e '.[dev]'") from exc
    files = proto_files(src_root)
    if not files:
        raise CodegenError(f"no .proto files under {src_root / 'proto'}")
    include = str(Path(protoc.__file__).parent / "_proto")
    out = str(out_root)
    args = [
        "protoc",
        f"-I{src_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *(str(f) for f in files),
    ]
    if protoc.main(args) != 0:
        raise CodegenError(f"protoc failed on {', '.join(map(str, files))}")
    _add_package_markers(out_root, files)
    return generated_files(out_root)


def _add_package_markers(out_root: Path, files: list[Path]) -> None:
    for proto in files:
        folder = (out_root / proto).parent
        while folder != out_root:
            marker = folder / "__init__.py"
            if not marker.exists():
                marker.write_text("")
            folder = folder.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
