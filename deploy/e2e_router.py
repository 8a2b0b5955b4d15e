"""Checks of the router tier of a running compose cluster (router, language and encode replicas).

    python deploy/e2e_router.py prefix --base-url URL --language C0 C1 --router R
    python deploy/e2e_router.py repeats --base-url URL --language C0 C1 --encode E0 E1
    python deploy/e2e_router.py rejoin --base-url URL --language C --router R

`prefix`: groups of requests sharing a long prompt prefix (a document, then one question each),
the groups interleaved: the router keeps each group on one replica, so the language replicas'
prefix caches hit at least --min-hit-ratio of the prompt tokens (round robin would split each
group over both replicas and miss the first request of every group on each).
`repeats`: images sent once, then again with other questions: at least --min-hit-ratio of the
repeats hit an encode replica's cache whichever language replica served them (every language
replica sends an image to the encode replica its content hashes to).
`rejoin`: once a killed language replica is back and healthy, the router sends it requests again.
Container metrics are read with `docker exec` (their ports are not published).
scripts/compose_e2e.sh runs all three.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import secrets
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deploy.cluster_metrics import by_label, total  # noqa: E402 - after the path is set
from deploy.e2e_http import CheckError, post_chat  # noqa: E402
from scripts.shapes_vl.chat import chat_messages  # noqa: E402

DOCUMENT = (
    "Shapes handbook, section {group}. A circle has no corners, a square has four equal sides "
    "and four right angles, a triangle has three sides. Colours in the pictures are red, green, "
    "blue and yellow. When counting shapes, count every separate outline once, however small. "
    "When asked for a position, answer left, right, top or bottom of the picture. Section "
    "{group} ends here; every answer stays short. "
)
QUESTIONS = ("How many corners?", "Which colour is first?", "Name a shape.", "Count to three.")


def _language_sources(containers: list[str]) -> list[str]:
    return [f"{c}:8000" for c in containers]


def run_prefix(args: argparse.Namespace) -> None:
    sources = _language_sources(args.language)
    hits0 = total(sources, "splitvl_language_prefix_cache_hits_total")
    queries0 = total(sources, "splitvl_language_prefix_cache_queries_total")
    before = by_label(f"{args.router}:29000", "smg_worker_requests_total", "worker")
    for turn in range(args.per_group):  # interleaved: no group's requests run back to back
        for group in range(args.groups):
            system = DOCUMENT.format(group=f"{group}-{args.seed}") * 3
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]},
            ]
            post_chat(args.base_url, messages)
    hits = total(sources, "splitvl_language_prefix_cache_hits_total") - hits0
    queries = total(sources, "splitvl_language_prefix_cache_queries_total") - queries0
    after = by_label(f"{args.router}:29000", "smg_worker_requests_total", "worker")
    per_worker = {w: after[w] - before.get(w, 0.0) for w in after}
    ratio = hits / queries if queries else 0.0
    print(
        f"prefix: {args.groups} groups x {args.per_group} requests: prefix-cache hits "
        f"{hits:.0f} of {queries:.0f} prompt tokens ({ratio:.0%}); requests per replica "
        f"{per_worker}",
        flush=True,
    )
    if ratio < args.min_hit_ratio:
        raise CheckError(f"prefix-cache hit ratio {ratio:.0%} below {args.min_hit_ratio:.0%}")


def run_repeats(args: argparse.Namespace) -> None:
    from scripts.shapes_vl.data import make_dataset

    examples = make_dataset(args.seed, args.images)
    sources = [f"{c}:9101" for c in args.encode]

    def one_round(question_offset: int) -> None:
        jobs = []
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for index, example in enumerate(examples):
                question = QUESTIONS[(index + question_offset) % len(QUESTIONS)]
                jobs.append(
                    pool.submit(post_chat, args.base_url, chat_messages(example.image, question))
                )
            for job in jobs:
                job.result()

    one_round(0)
    hits0 = total(sources, "splitvl_encode_cache_hits_total")
    served0 = [
        total([s], "splitvl_language_requests_finished_total")
        for s in _language_sources(args.language)
    ]
    one_round(1)  # the same images, other questions: the router may pick either replica
    hits = total(sources, "splitvl_encode_cache_hits_total") - hits0
    served = [
        total([s], "splitvl_language_requests_finished_total") - before
        for s, before in zip(_language_sources(args.language), served0, strict=True)
    ]
    ratio = hits / len(examples)
    print(
        f"repeats: {len(examples)} images sent again: {hits:.0f} encode-cache hits ({ratio:.0%}); "
        f"requests per language replica {served}",
        flush=True,
    )
    if ratio < args.min_hit_ratio:
        raise CheckError(
            f"encode-cache hit ratio of repeats {ratio:.0%} below {args.min_hit_ratio:.0%}"
        )


def _healthy(container: str) -> bool:
    done = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() == "healthy"


def run_rejoin(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    while not _healthy(args.language):
        if time.monotonic() > deadline:
            raise CheckError(f"{args.language} is not healthy again after {args.timeout:.0f} s")
        time.sleep(1)
    name = args.worker
    served = 0.0
    while time.monotonic() < deadline:
        before = by_label(f"{args.router}:29000", "smg_worker_requests_total", "worker").get(
            name, 0
        )
        for _ in range(8):
            # Texts sharing no prefix with anything sent before (a shared one would pin them to
            # the replica holding it): the router places them on the replica with less cached
            post_chat(
                args.base_url,
                [{"role": "user", "content": f"{secrets.token_hex(16)} is a fresh question"}],
            )
        served = (
            by_label(f"{args.router}:29000", "smg_worker_requests_total", "worker").get(name, 0)
            - before
        )
        if served:
            print(f"rejoin: {name} is back and served {served:.0f} of 8 new requests", flush=True)
            return
        time.sleep(2)  # the router readmits it after its health checks pass
    raise CheckError(f"the router sent {name} no request after it came back")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python deploy/e2e_router.py", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    prefix = sub.add_parser("prefix", help="shared-prefix groups: prefix-cache hits")
    prefix.add_argument("--base-url", required=True)
    prefix.add_argument("--language", nargs="+", required=True, help="language containers")
    prefix.add_argument("--router", required=True, help="router container")
    prefix.add_argument("--groups", type=int, default=6)
    prefix.add_argument("--per-group", type=int, default=4)
    prefix.add_argument("--seed", type=int, default=0)
    prefix.add_argument("--min-hit-ratio", type=float, default=0.6)
    repeats = sub.add_parser("repeats", help="repeated images: encode-cache hits")
    repeats.add_argument("--base-url", required=True)
    repeats.add_argument("--language", nargs="+", required=True)
    repeats.add_argument("--encode", nargs="+", required=True, help="encode containers")
    repeats.add_argument("--images", type=int, default=16)
    repeats.add_argument("--concurrency", type=int, default=4)
    repeats.add_argument("--seed", type=int, default=7)
    repeats.add_argument("--min-hit-ratio", type=float, default=0.9)
    rejoin = sub.add_parser("rejoin", help="a restarted language replica gets traffic again")
    rejoin.add_argument("--base-url", required=True)
    rejoin.add_argument("--language", required=True, help="the restarted language container")
    rejoin.add_argument("--worker", required=True, help="its URL as the router names it")
    rejoin.add_argument("--router", required=True)
    rejoin.add_argument("--timeout", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"prefix": run_prefix, "repeats": run_repeats, "rejoin": run_rejoin}[args.command]
    try:
        run(args)
    except (CheckError, OSError, subprocess.CalledProcessError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
