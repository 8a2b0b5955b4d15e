"""Checks a running splitvl cluster from outside, through its published HTTP port.

    python deploy/e2e_client.py answers --base-url http://127.0.0.1:8000 [-n 40]
    python deploy/e2e_client.py load --base-url URL --kill CONTAINER [--survivor CONTAINER]

`answers` asks held-out questions about generated shape images (scripts/shapes_vl/data.py) and
checks the shipped model's greedy answers exactly, as tests/e2e/test_shapes_accuracy.py does.
`load` runs a bounded load of chat requests with unique images (`python -m bench.serve
--dataset-name random-mm` when the repository has it, else a small asyncio loop of its own),
kills one encode container with `docker kill` once a share of the requests has finished, and
checks that every request still succeeded: the language service retries an image on the other
replica. scripts/compose_e2e.sh runs both; run from the repository root.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deploy.cluster_metrics import total  # noqa: E402 - after the path is set
from scripts.shapes_vl.chat import chat_messages  # noqa: E402

REQUEST_TIMEOUT_S = 120.0


class CheckError(RuntimeError):
    """The cluster answered wrongly, lost a request, or could not be reached."""


def model_name(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as reply:
        return json.load(reply)["data"][0]["id"]


# ---------------------------------------------------------------------------------- answers


async def _answers(base_url: str, num: int, in_flight: int) -> list[tuple]:
    import openai

    from scripts.shapes_vl.data import make_dataset
    from scripts.shapes_vl.evaluate import HELD_OUT_SEED

    examples = make_dataset(HELD_OUT_SEED, num)
    name = model_name(base_url)
    gate = asyncio.Semaphore(in_flight)
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )

    async def ask(example):
        async with gate:
            start = time.monotonic()
            reply = await client.chat.completions.create(
                model=name,
                messages=chat_messages(example.image, example.question),
                temperature=0,
                max_tokens=32,
            )
            return example, reply.choices[0].message.content, time.monotonic() - start

    try:
        return list(await asyncio.gather(*(ask(ex) for ex in examples)))
    finally:
        await client.close()


def run_answers(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    results = asyncio.run(_answers(args.base_url, args.n, args.in_flight))
    correct = 0
    for i, (ex, answer, seconds) in enumerate(results, 1):
        ok = answer == ex.answer
        correct += ok
        w, h = ex.image.size
        print(
            f"[{i:2d}/{len(results)}] {w}x{h} {ex.kind:8s} Q: {ex.question!r}  A: {answer!r}  "
            f"expected {ex.answer!r} {'ok' if ok else 'MISS'} ({seconds * 1000:.0f} ms)"
        )
    accuracy = correct / len(results)
    print(
        f"answers: {correct}/{len(results)} exact ({accuracy:.0%}) in "
        f"{time.monotonic() - t0:.1f} s",
        flush=True,
    )
    if accuracy < args.min_accuracy:
        raise CheckError(f"accuracy {accuracy:.0%} below {args.min_accuracy:.0%}")
    return 0


# ------------------------------------------------------------------------------------- load


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
            f"{args.base_url}/metrics",
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
            try:
                stream = await client.chat.completions.create(
                    model=name,
                    messages=messages,
                    stream=True,
                    max_tokens=args.output_len,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                    stream_options={"include_usage": True},
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
        use_bench = bench_serve_available()
        if not use_bench:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python deploy/e2e_client.py", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    answers = sub.add_parser("answers", help="held-out questions, exact answers")
    answers.add_argument("--base-url", required=True, help="http://HOST:PORT")
    answers.add_argument("-n", type=int, default=40, help="questions")
    answers.add_argument("--in-flight", type=int, default=8)
    answers.add_argument("--min-accuracy", type=float, default=0.9)
    load = sub.add_parser("load", help="bounded load, one container killed midway")
    load.add_argument("--base-url", required=True)
    load.add_argument("--num-prompts", type=int, default=64)
    load.add_argument("--max-concurrency", type=int, default=8)
    load.add_argument("--input-len", type=int, default=32)
    load.add_argument("--output-len", type=int, default=24)
    load.add_argument(
        "--image-sizes",
        default="192x192:0.5,256x160:0.5",
        help="bench.serve --random-mm-bucket-config",
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--kill", help="encode container to docker kill during the load")
    load.add_argument(
        "--kill-after", type=int, default=16, help="finished requests before the kill"
    )
    load.add_argument(
        "--kill-how",
        choices=("docker", "pid"),
        default="docker",
        help="docker kill, or SIGKILL of its process from the host (a crash: it restarts)",
    )
    load.add_argument(
        "--metrics",
        action="append",
        help="the language replicas' metrics, a URL or CONTAINER:PORT (default: BASE_URL/metrics)",
    )
    load.add_argument("--survivor", help="the other encode container (reports its image count)")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole load")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_answers(args) if args.command == "answers" else run_load(args)
    except (CheckError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
