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
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deploy.e2e_http import REQUEST_TIMEOUT_S, CheckError, model_name  # noqa: E402
from deploy.e2e_load import run_load  # noqa: E402
from scripts.shapes_vl.chat import chat_messages  # noqa: E402

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
    # Long enough answers that the kill lands while most requests are still running (a load of
    # 24-token answers was over before `docker kill` returned)
    load.add_argument("--output-len", type=int, default=96)
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
    load.add_argument(
        "--scrape",
        help="the Prometheus URL bench.serve scrapes (default BASE_URL/metrics; a router's: "
        "requests per replica)",
    )
    load.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="whole answers instead of streams (the built-in load): a request whose replica dies "
        "is retried whole by a router, where a started stream can only end with an error",
    )
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
