"""The `load` check: a bounded load with one container killed once a share of it finished.

`python -m bench.serve --dataset-name random-mm` when the checkout has it, else a small asyncio
loop of its own; every request must succeed whichever replica died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.cluster_metrics import total
from deploy.e2e_http import REPO, REQUEST_TIMEOUT_S, CheckError, model_name
from scripts.shapes_vl.chat import chat_messages


def finished_requests(sources: list[str]) -> float:
    """requests_finished_total over finish reasons, summed over the language replicas."""
    return total(sources, "splitvl_language_requests_finished_total")


def encode_images(container: str) -> float | None:
    """splitvl_encode_images_total of an encode container (its metrics port is not published)."""
    try:
        return total([f"{container}:9101"], "splitvl_encode_images_total")
    except OSError:
        return None


def kill(container: str, how: str) -> subprocess.CompletedProcess:
    """`docker kill` the container, or SIGKILL its main process from the host (`pid`): a crash,
    which the restart policy answers, where `docker kill` counts as stopping it on purpose."""
    if how == "docker":
        return subprocess.run(["docker", "kill", container], capture_output=True, text=True)
    pid = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return subprocess.run(["kill", "-9", pid], capture_output=True, text=True)


@dataclass
class Killer:
    """Kills `container` once the language replicas have finished `after` requests (a watcher
    thread)."""

    sources: list[str]  # the language replicas' metrics
    container: str
    after: int
    how: str = "docker"
    killed_at: float | None = None
    finished_at_kill: float | None = None
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._baseline = finished_requests(self.sources)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            try:
                done = finished_requests(self.sources) - self._baseline
            except OSError:
                continue
            if done >= self.after:
                killed = kill(self.container, self.how)
                self.killed_at, self.finished_at_kill = time.monotonic(), done
                if killed.returncode != 0:
                    self.error = killed.stderr.strip()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def bench_serve_available() -> bool:
    """True when this checkout has the `python -m bench.serve` load generator."""
    if not (REPO / "bench" / "serve" / "__main__.py").is_file():
        return False
    probe = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.returncode == 0 and "--dataset-name" in probe.stdout


def load_with_bench_serve(args: argparse.Namespace) -> dict:
    """`python -m bench.serve` against the cluster; its result JSON (completed, failed, ...)."""
    with tempfile.TemporaryDirectory(prefix="splitvl-e2e-load-") as tmp:
        command = [
            sys.executable,
            "-m",
            "bench.serve",
            "--base-url",
            args.base_url,
            "--dataset-name",
            "random-mm",
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(args.max_concurrency),
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--random-mm-bucket-config",
            args.image_sizes,
            "--ignore-eos",
            "--tokenizer",
            str(REPO / "models" / "shapes-vl" / "tokenizer.json"),
            "--timeout",
            str(REQUEST_TIMEOUT_S),
            "--seed",
            str(args.seed),
            "--disable-tqdm",
            "--metrics-url",
            args.scrape or f"{args.base_url}/metrics",
            "--save-result",
            "--result-dir",
            tmp,
            "--result-filename",
            "load.json",
        ]
        print("load: " + " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=REPO, timeout=args.timeout)
        path = Path(tmp) / "load.json"
        if not path.is_file():
            raise CheckError(f"bench.serve exited with {done.returncode} and wrote no result")
        result = json.loads(path.read_text())
    return {
        "completed": result["completed"],
        "failed": result["failed"],
        "duration": result["duration"],
        "output_throughput": result["output_throughput"],
        "request_throughput": result["request_throughput"],
        "median_ttft_ms": result["median_ttft_ms"],
        "errors": [e for e in result.get("errors") or [] if e],
    }


async def _own_load(args: argparse.Namespace) -> dict:
    """The fallback load: streamed chats, one unique random shapes image each."""
    import openai

    from scripts.shapes_vl.data import random_scene, render

    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.num_prompts):
        image = render(random_scene(rng), rng)
        prompts.append(chat_messages(image, "Describe the image."))
    name = model_name(args.base_url)
    client = openai.AsyncOpenAI(
        base_url=f"{args.base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    gate = asyncio.Semaphore(args.max_concurrency)
    ttfts, errors, tokens = [], [], [0]

    async def one(messages) -> None:
        async with gate:
            start = time.monotonic()
            request = dict(
                model=name,
                messages=messages,
                max_tokens=args.output_len,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            try:
                if not args.stream:  # whole answers: a router can retry one on another replica
                    reply = await client.chat.completions.create(**request)
                    tokens[0] += reply.usage.completion_tokens
                    ttfts.append(time.monotonic() - start)
                    return
                stream = await client.chat.completions.create(
                    **request, stream=True, stream_options={"include_usage": True}
                )
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - start
                    if chunk.usage is not None:
                        tokens[0] += chunk.usage.completion_tokens
                ttfts.append(first if first is not None else time.monotonic() - start)
            except openai.OpenAIError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(m) for m in prompts))
    finally:
        await client.close()
    duration = time.monotonic() - t0
    ttfts.sort()
    return {
        "completed": len(ttfts),
        "failed": len(errors),
        "duration": duration,
        "output_throughput": tokens[0] / duration,
        "request_throughput": len(ttfts) / duration,
        "median_ttft_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
        "errors": errors,
    }


def run_load(args: argparse.Namespace) -> int:
    survivor_before = encode_images(args.survivor) if args.survivor else None
    sources = args.metrics or [f"{args.base_url}/metrics"]
    killer = Killer(sources, args.kill, args.kill_after, args.kill_how) if args.kill else None
    if killer is not None:
        killer.start()
    try:
        use_bench = args.stream and bench_serve_available()
        if args.stream and not use_bench:
            print(
                "load: bench.serve not in this checkout; using the built-in asyncio load",
                flush=True,
            )
        result = load_with_bench_serve(args) if use_bench else asyncio.run(_own_load(args))
    finally:
        if killer is not None:
            killer.stop()
    print(
        f"load: {result['completed']}/{args.num_prompts} completed, {result['failed']} failed "
        f"in {result['duration']:.1f} s: {result['request_throughput']:.2f} req/s, "
        f"{result['output_throughput']:.1f} output tok/s, median TTFT "
        f"{result['median_ttft_ms'] or 0:.0f} ms",
        flush=True,
    )
    problems = []
    if killer is not None:
        if killer.killed_at is None:
            problems.append(
                f"{args.kill} was never killed (fewer than {args.kill_after} requests finished)"
            )
        elif killer.error:
            problems.append(f"docker kill {args.kill} failed: {killer.error}")
        else:
            print(
                f"load: killed container {args.kill[:12]} ({args.kill_how}) after "
                f"{killer.finished_at_kill:.0f} finished requests",
                flush=True,
            )
    if args.survivor:
        after = encode_images(args.survivor)
        if survivor_before is not None and after is not None:
            print(
                f"load: surviving encode replica encoded {after - survivor_before:.0f} images "
                "during the load",
                flush=True,
            )
    if result["completed"] != args.num_prompts or result["failed"]:
        problems.append(
            f"{args.num_prompts - result['completed']} requests lost; errors: "
            f"{result['errors'][:5]}"
        )
    if problems:
        raise CheckError("; ".join(problems))
    print("load: no request lost", flush=True)
    return 0
