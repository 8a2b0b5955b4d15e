"""Builds (or finds) the CPU kernel extension and reports: ``python -m shared.kernels.cpu``.

Exits 1 only when a C++ compiler exists and the build still failed; a machine without a
compiler runs the PyTorch references, which is not an error.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.kernels.cpu", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    from shared.kernels.cpu import build

    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"cpu features: {' '.join(build.cpu_features()) or 'unknown'}")
    cxx = build.compiler()
    print(f"compiler: {cxx or 'none'}")
    start = time.perf_counter()
    try:
        path, compiled = build.library(verbose=args.verbose)
        torch.ops.load_library(str(path))
    except Exception as exc:
        print(f"loaded: False ({type(exc).__name__}: {exc})")
        return 1 if cxx else 0
    took = time.perf_counter() - start
    print(f"{'compiled' if compiled else 'found cached'} {path} in {took:.1f} s")
    print(f"loaded: {hasattr(torch.ops.splitvl, 'fused_moe')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
