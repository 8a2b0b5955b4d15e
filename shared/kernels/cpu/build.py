"""Compiles the CPU kernel extension once per machine and loads it.

The build directory is keyed by the torch version and a hash of the sources, the compile
flags and the CPU (the code is built with ``-march=native``, so a cache shared with another
machine must not hand over a binary using instructions this one lacks). The root
is ``$SPLITVL_KERNEL_CACHE`` or ``~/.cache/splitvl/kernels``. A file lock serializes builds of
one directory across processes; a ``complete`` marker written after a successful build lets
later processes load the library without invoking the compiler or ninja at all.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

NAME = "splitvl_cpu_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "moe.cpp", "linear.cpp", "attention.cpp", "norm.cpp", "combine.cpp")
HEADERS = ("common.h", "kernels.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG")
# Overrides -march=native: the tests build the code an AVX2-only or a pre-AVX CPU gets on this
# machine (haswell, x86-64-v2) and check it too.
MARCH_ENV = "SPLITVL_KERNEL_MARCH"
LDFLAGS = ("-fopenmp",)
LOCK_TIMEOUT_S = 300.0  # another process compiling the same directory: wait this long at most

# CPU flags worth reporting (x86 /proc/cpuinfo "flags", Arm "Features").
_FEATURES = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
    "bf16",
)


def cflags() -> tuple[str, ...]:
    """The compile flags, with $SPLITVL_KERNEL_MARCH for -march where set."""
    march = os.environ.get(MARCH_ENV)
    return tuple(f"-march={march}" if f == "-march=native" and march else f for f in CFLAGS)


class BuildError(RuntimeError):
    """The extension could not be built or loaded here; the message says why."""


def compiler() -> str | None:
    """Path of the C++ compiler torch's JIT would use (``$CXX`` or ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpuinfo() -> tuple[str, list[str], str]:
    """(model name, flags, vendor_id) of this CPU, from /proc/cpuinfo where it exists."""
    model, flags, vendor = platform.processor() or platform.machine(), [], ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags, vendor
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.split()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
    return model, flags, vendor


def cpu_model() -> str:
    """This CPU's model name."""
    return _cpuinfo()[0]


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), or "" where it does not say."""
    return _cpuinfo()[2]


def cpu_features() -> list[str]:
    """The SIMD features of this CPU that matter to the kernels."""
    flags = set(_cpuinfo()[1])
    return [f for f in _FEATURES if f in flags]


def cpu_summary() -> str:
    """One line naming this CPU, its usable cores and the SIMD features the kernels use: what a
    benchmark prints beside its numbers (machines differ from run to run)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {cpu_model()}, {cores} usable cores; ISA: {' '.join(cpu_features()) or 'unknown'}"


def cache_dir() -> Path:
    """The build directory for these sources and flags, this torch and this CPU."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    model, flags, _ = _cpuinfo()
    for part in (
        *cflags(),
        "|",
        *LDFLAGS,
        "|",
        model,
        *flags,
        platform.machine(),
        torch.__version__,
        str(torch.version.git_version),
    ):
        digest.update(part.encode() + b"\0")
    root = os.environ.get("SPLITVL_KERNEL_CACHE") or Path.home() / ".cache/splitvl/kernels"
    return Path(root) / f"{torch.__version__}-{digest.hexdigest()[:16]}"


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's JIT runs ``ninja`` from PATH; a venv's ninja may not be on it."""
    saved = os.environ.get("PATH", "")
    extra = [str(Path(sys.executable).parent)]
    try:
        import ninja  # the PyPI wheel

        extra.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([saved, *extra]) if saved else os.pathsep.join(extra)
    try:
        if shutil.which("ninja") is None:
            raise BuildError("ninja is not installed (pip install ninja)")
        yield
    finally:
        os.environ["PATH"] = saved


def _compile(directory: Path, verbose: bool) -> None:
    from torch.utils.cpp_extension import load

    # torch's own lock file, left behind by a build that was killed, would make load() wait
    # forever; we hold the directory's file lock, so no live build owns it.
    (directory / "lock").unlink(missing_ok=True)
    with _ninja_on_path():
        try:
            load(
                name=NAME,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(cflags()),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise BuildError(_first_error(str(exc))) from exc


def _first_error(message: str) -> str:
    """The compiler's first error line, or the message's first line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for line in lines:
        if "error" in line.lower() and "Error building extension" not in line:
            return line[:400]
    return lines[0][:400] if lines else "unknown build failure"


def library(verbose: bool = False) -> tuple[Path, bool]:
    """(path of the built shared library, whether this call compiled it); raises BuildError.

    A finished build is used without a compiler; building needs one, and ninja."""
    directory = cache_dir()
    path, marker = directory / f"{NAME}.so", directory / "complete"
    if marker.exists() and path.exists():
        return path, False
    if compiler() is None:
        raise BuildError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    from filelock import FileLock, Timeout  # a dependency of torch

    directory.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(directory / "build.lock"), timeout=LOCK_TIMEOUT_S):
            if marker.exists() and path.exists():  # another process built it meanwhile
                return path, False
            _compile(directory, verbose)
            if not path.exists():
                raise BuildError(f"the build left no {path.name} in {directory}")
            marker.write_text(" ".join(cflags()) + "\n")
            return path, True
    except Timeout as exc:
        raise BuildError(
            f"another process held {directory}/build.lock for {LOCK_TIMEOUT_S:.0f} s"
        ) from exc
