"""The one device check: every step time-limited, each result written as it comes, one table.

    python -m bench.gpu_check [--quick] [--out DIR]

Steps (a subprocess each, under its own time limit): the `gpu` tests; decode throughput of the
engine beside transformers' `generate` at batch 1/16/64/128 on the 30B-A3B shape (graph capture
time and memory included, max_model_len 32k); the vision tower and a 1-image + 42-token prefill
beside transformers; the fused-MoE and paged-decode kernels' bandwidth. After every step the
table is rewritten to DIR/table.md (and printed at the end), so a step that runs out of time
still leaves the others' numbers. `--quick` (run it first) is a smaller subset within 180 s; the
full check fits 480 s, both inside one 600-s device call with the machine's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

QUICK_BUDGET_S = 180
FULL_BUDGET_S = 480


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    argv: tuple[str, ...]  # {out} is the results folder


def _py(*args: str) -> tuple[str, ...]:
    return (sys.executable, *args)


_DECODE = ("-m", "bench.decode", "--shape", "30b-a3b", "--device", "cuda", "--dtype", "bfloat16")
_DECODE += ("--prompt", "512", "--max-model-len", "32768", "--hf")
_PREFILL = ("-m", "bench.prefill", "--shape", "30b-a3b", "--device", "cuda", "--dtype", "bfloat16")
_TESTS = ("-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "tests/kernels", "-p", "no:cacheprovider")

PLANS: dict[str, tuple[Step, ...]] = {
    "quick": (
        Step("gpu_tests", 60, _py(*_TESTS, "-x")),
        Step(
            "decode",
            80,
            _py(*_DECODE, "--batches", "1,64", "--new", "16", "--out", "{out}/decode.json"),
        ),
        Step("prefill", 40, _py(*_PREFILL, "--out", "{out}/prefill.json")),
    ),
    "full": (
        Step("gpu_tests", 120, _py(*_TESTS)),
        Step(
            "decode",
            180,
            _py(*_DECODE, "--batches", "1,16,64,128", "--new", "32", "--out", "{out}/decode.json"),
        ),
        Step("prefill", 80, _py(*_PREFILL, "--hf", "--out", "{out}/prefill.json")),
        Step(
            "kernels",
            90,
            _py(
                "-m",
                "bench.kernels_triton",
                "--rounds",
                "5",
                "--tokens",
                "1",
                "16",
                "64",
                "128",
                "1024",
                "--batches",
                "1",
                "16",
                "64",
                "--contexts",
                "2048",
                "32768",
                "--out",
                "{out}/kernels.json",
            ),
        ),
    ),
}


def budget(plan: str) -> int:
    """The sum of a plan's step limits (what the check can take at most, start-up aside)."""
    return sum(step.limit_s for step in PLANS[plan])


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def table(out: Path) -> str:
    """The results found in `out` as one markdown table (missing steps show as -)."""
    decode, prefill, kernels = (
        _load(out / f) for f in ("decode.json", "prefill.json", "kernels.json")
    )
    rows = ["| measure | splitvl | transformers | ratio |", "|---|---|---|---|"]

    def row(name: str, ours, theirs, unit: str, higher_is_better: bool = True) -> None:
        fmt = lambda v: "-" if v is None else f"{v:,.1f} {unit}"  # noqa: E731
        ratio = "-"
        if ours and theirs:
            ratio = f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"
        rows.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")

    ours, theirs = decode.get("engine_tok_s", {}), decode.get("hf_tok_s", {})
    for batch in sorted({*ours, *theirs}, key=int):
        row(f"decode B={batch}", ours.get(batch), theirs.get(batch), "tok/s")
    ours, theirs = prefill.get("engine", {}), prefill.get("hf", {})
    row("vision, 1024-token image", ours.get("vision_ms"), theirs.get("vision_ms"), "ms", False)
    row(
        "prefill, 1 image + 42 tokens",
        ours.get("prefill_ms"),
        theirs.get("prefill_ms"),
        "ms",
        False,
    )
    capture = decode.get("graph_capture", {})
    if capture:
        held = f"{capture['seconds']:.1f} s, {capture['bytes'] / 2**20:,.0f} MiB"
        rows.append(f"| graph capture | {held} | - | - |")
    for kind in ("fused_moe", "paged_decode"):
        for label, result in kernels.get(kind, {}).items():
            gbps = result.get("gbps", {})
            row(f"{kind} {label}", gbps.get("triton"), None, "GB/s")
    return "\n".join(rows) + "\n"


def run(plan: str, out: Path) -> int:
    """Run the plan's steps; returns the number that failed or ran out of time."""
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with (out / "summary.txt").open("a") as summary:
        for step in PLANS[plan]:
            argv = [a.replace("{out}", str(out)) for a in step.argv]
            print(f"=== {step.name} (limit {step.limit_s} s): {' '.join(argv)}", flush=True)
            start = time.monotonic()
            with (out / f"{step.name}.log").open("w") as log:
                try:
                    status = subprocess.run(
                        argv, stdout=log, stderr=subprocess.STDOUT, timeout=step.limit_s
                    ).returncode
                except subprocess.TimeoutExpired:
                    status = "timeout"
            line = f"{step.name}: {status} after {time.monotonic() - start:.0f} s"
            print(line, flush=True)
            summary.write(line + "\n")
            failed += status != 0
            (out / "table.md").write_text(table(out))
    print(table(out))
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a subset within {QUICK_BUDGET_S} s")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    args = parser.parse_args(argv)
    return min(run("quick" if args.quick else "full", Path(args.out)), 1)


if __name__ == "__main__":
    sys.exit(main())
