"""Overload: at four times what the machine sustains, admission control (--max-queue-delay) keeps
the time to first token of admitted requests within the bound, refuses the excess at once with
429, and keeps goodput near the sustained peak. Measured with `python -m bench.serve` (its
result JSON), against a service without admission control as the control.

The sustained rate is measured first on this machine (a closed loop at 16 concurrent requests),
so the test holds on slower or busier machines too. Without admission control the same load
breaks the bound by far (one run: admitted p99 TTFT 23 s at 4x), so the bound assertion is what
fails when admission control breaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from scripts.testkit.launch import REPO, start_language
from tests.e2e.support import wait_for_idle_kv

BOUND_S = 1.0
OVERLOAD = 4.0
OVERLOAD_S = 8.0
LANGUAGE_ARGS = [
    "--served-model-name",
    "shapes-vl",
    "--max-model-len",
    "2048",
    "--kv-cache-memory",
    "128MiB",
    "--max-num-seqs",
    "64",
]
BENCH_ARGS = [
    "--dataset-name",
    "random",
    "--random-input-len",
    "128",
    "--random-output-len",
    "32",
    "--ignore-eos",
    "--disable-tqdm",
    "--save-result",
]


@pytest.fixture(scope="module")
def services(e2e_model, tmp_path_factory):
    if not e2e_model.trained:
        pytest.skip("needs the shipped model")
    workdir = tmp_path_factory.mktemp("overload")
    started: dict = {}

    def start(name, extra):
        started[name] = start_language(e2e_model.path, workdir, [*LANGUAGE_ARGS, *extra], name=name)

    threads = [
        threading.Thread(target=start, args=("plain", [])),
        threading.Thread(target=start, args=("guarded", ["--max-queue-delay", str(BOUND_S)])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert set(started) == {"plain", "guarded"}, "a language service did not start"
        yield {name: (proc, url) for name, (proc, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            proc.stop()


def bench(base_url: str, workdir: Path, name: str, *args: str) -> dict:
    """One `python -m bench.serve` run; its result JSON, with the outcome of every request."""
    command = [
        sys.executable,
        "-m",
        "bench.serve",
        "--base-url",
        base_url,
        *BENCH_ARGS,
        "--result-dir",
        str(workdir),
        "--result-filename",
        f"{name}.json",
        *args,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((workdir / f"{name}.json").read_text())


def outcome(result: dict) -> dict:
    rows = result["requests"]
    admitted = [r for r in rows if r["success"]]
    shed = [r for r in rows if r["error"].startswith("HTTP 429")]
    failed = [r for r in rows if not r["success"] and not r["error"].startswith("HTTP 429")]
    ttfts = [r["ttft_s"] for r in admitted]
    return {
        "sent": len(rows),
        "admitted": len(admitted),
        "shed": len(shed),
        "failed": failed,
        "p50_ttft_s": float(np.percentile(ttfts, 50)) if ttfts else None,
        "p99_ttft_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "p99_shed_s": float(np.percentile([r["e2el_s"] for r in shed], 99)) if shed else None,
        # vLLM's goodput: requests that met the SLO (here the bound) per second
        "goodput": sum(t <= BOUND_S for t in ttfts) / result["duration"],
    }


def test_admission_control_holds_the_ttft_bound_at_four_times_the_sustained_rate(
    services, tmp_path
):
    _, plain_url = services["plain"]
    _, guarded_url = services["guarded"]
    sustained = bench(
        plain_url, tmp_path, "sustained", "--num-prompts", "64", "--max-concurrency", "16"
    )["request_throughput"]
    rate = OVERLOAD * sustained
    num = str(int(rate * OVERLOAD_S))
    # Warm-ups first, as a service gets before taking traffic: the first requests of a fresh
    # process are slow, and admission control has measured no rate yet
    guarded_run = outcome(
        bench(
            guarded_url,
            tmp_path,
            "guarded",
            "--num-prompts",
            num,
            "--request-rate",
            f"{rate:.3f}",
            "--num-warmups",
            "8",
        )
    )
    print(
        f"sustained {sustained:.2f} req/s, offered {rate:.2f} req/s, bound {BOUND_S} s; "
        f"with --max-queue-delay: {_summary(guarded_run)}"
    )
    assert not guarded_run["failed"], guarded_run["failed"][:3]
    assert guarded_run["shed"] > 0, "nothing was shed at four times the sustained rate"
    assert guarded_run["p99_ttft_s"] <= BOUND_S, guarded_run
    assert guarded_run["p99_shed_s"] < 0.5, "refusals must come at once"
    assert guarded_run["goodput"] >= 0.7 * sustained, guarded_run
    for url in (plain_url, guarded_url):
        wait_for_idle_kv(url, timeout_s=60)


def _summary(run: dict) -> str:
    return (
        f"{run['sent']} sent, {run['admitted']} admitted, {run['shed']} shed (429), "
        f"{len(run['failed'])} failed, admitted TTFT p50 {run['p50_ttft_s']:.3f} s p99 "
        f"{run['p99_ttft_s']:.3f} s, goodput {run['goodput']:.2f} req/s"
    )
