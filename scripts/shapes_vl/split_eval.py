"""Held-out accuracy of the shapes model through the full split path, over both transports.

    .venv/bin/python -m scripts.shapes_vl.split_eval --model models/shapes-vl -n 200

Asks the same held-out questions (seed evaluate.HELD_OUT_SEED) three ways: HTTP -> language ->
encode as real processes with the embeddings inline in gRPC, the same with the embeddings over
the torch.distributed link (`--transport nccl`; gloo on CPU), and through `shared.model` in this
process. Prints exact-match accuracy per question kind for each, how many answers the three share,
then the ablations (deepstack embeddings zeroed, image embeddings zeroed) from evaluate.py.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from scripts.demo import DEFAULT_MODEL, ClusterConfig, chat_messages, running_cluster
from scripts.shapes_vl.answers import MAX_NEW_TOKENS
from scripts.shapes_vl.data import Example, make_dataset
from scripts.shapes_vl.evaluate import HELD_OUT_SEED, Report, shared_answerer

TRANSPORTS = ("grpc", "nccl")
ABLATIONS = ("no_deepstack", "no_image")
REQUEST_TIMEOUT_S = 300.0


def report_of(answers: Sequence[str], examples: Sequence[Example]) -> Report:
    """Exact-match counts per question kind for answers given in example order."""
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for got, ex in zip(answers, examples, strict=True):
        total[ex.kind] += 1
        correct[ex.kind] += got == ex.answer
    return Report(dict(correct), dict(total))


async def ask_cluster(
    base_url: str, model_name: str, examples: Sequence[Example], in_flight: int
) -> list[str]:
    """Greedy answers from a running language service, `in_flight` requests at a time."""
    import openai

    gate = asyncio.Semaphore(in_flight)
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    ) as client:

        async def ask(example: Example) -> str:
            async with gate:
                response = await client.chat.completions.create(
                    model=model_name,
                    temperature=0,
                    max_tokens=MAX_NEW_TOKENS,
                    messages=chat_messages(example.image, example.question),
                )
            return response.choices[0].message.content or ""

        return list(await asyncio.gather(*(ask(ex) for ex in examples)))


def split_answers(
    model_dir: Path, transport: str, examples: Sequence[Example], in_flight: int
) -> list[str]:
    """Start encode + language with `transport`, ask every example, stop both."""
    with tempfile.TemporaryDirectory(prefix=f"split-eval-{transport}-") as tmp:
        cfg = ClusterConfig(model_dir, Path(tmp), transport=transport, threads=1)
        with running_cluster(cfg) as cluster:
            return asyncio.run(
                ask_cluster(cluster.base_url, cluster.model_name, examples, in_flight)
            )


def in_process_answers(model_dir: Path, mode: str, examples: Sequence[Example]) -> list[str]:
    """Greedy answers from evaluate.py's `shared.model` answerer in `mode`."""
    answer = shared_answerer(model_dir, mode)
    return [answer(ex.image, ex.question) for ex in examples]


def timed(
    name: str, run: Callable[[], list[str]], examples: Sequence[Example], verbose: bool
) -> list[str]:
    """Run one route, then print its accuracy, per-kind lines and wall time."""
    start = time.monotonic()
    answers = run()
    report = report_of(answers, examples)
    print(
        f"{name}: {report.accuracy:.3f} exact on {len(examples)} held-out questions "
        f"({time.monotonic() - start:.0f} s)"
    )
    print("\n".join(report.lines()), flush=True)
    if verbose:
        for got, ex in zip(answers, examples, strict=True):
            if got != ex.answer:
                print(f"  miss [{ex.kind}] {ex.question!r}: got {got!r}, want {ex.answer!r}")
    return answers


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("-n", type=int, default=200, help="number of held-out questions")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--in-flight", type=int, default=16, help="concurrent requests")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablation runs")
    parser.add_argument("--verbose", action="store_true", help="print every wrong answer")
    args = parser.parse_args(argv)
    if args.n < 1 or args.in_flight < 1:
        raise SystemExit("-n and --in-flight must be at least 1")
    # One intra-op thread: the small model's matrices are tiny, and several threads spin-waiting
    # on a busy machine make every forward many times slower.
    torch.set_num_threads(1)
    model_dir = args.model.resolve()
    examples = make_dataset(args.seed, args.n)
    routes: dict[str, Callable[[], list[str]]] = {
        f"split/{t}": (lambda t=t: split_answers(model_dir, t, examples, args.in_flight))
        for t in TRANSPORTS
    }
    routes["in-process"] = lambda: in_process_answers(model_dir, "full", examples)
    answers = {name: timed(name, run, examples, args.verbose) for name, run in routes.items()}
    same = sum(len(set(row)) == 1 for row in zip(*answers.values(), strict=True))
    print(f"identical across {', '.join(answers)}: {same}/{args.n}", flush=True)
    if args.no_ablations:
        return
    for mode in ABLATIONS:
        timed(
            f"ablation/{mode}",
            lambda m=mode: in_process_answers(model_dir, m, examples),
            examples,
            args.verbose,
        )


if __name__ == "__main__":
    main()
