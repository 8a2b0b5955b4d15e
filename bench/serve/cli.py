"""`python -m bench.serve`: build the requests, find the model, run, report, save.

Exit status: 0 when the run happened (failed requests are reported, not fatal), 1 when the
server could not be reached or not one request succeeded, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence

import httpx

from bench.serve.args import Checked, build_parser, check_args
from bench.serve.client import RequestOptions, error_message
from bench.serve.datasets import (
    BenchRequest,
    DatasetError,
    RandomSpec,
    jsonl_requests,
    random_requests,
)
from bench.serve.metrics import compute_metrics, timeline
from bench.serve.report import (
    build_result,
    default_filename,
    format_failures,
    format_server_metrics,
    format_table,
    save_result,
)
from bench.serve.runner import RunConfig, RunOutcome, run_benchmark
from bench.serve.videos import VideoSpec

WARMUP_SEED_OFFSET = 1_000_003  # warm-ups get images of their own, never the run's


class ServerError(RuntimeError):
    """The server cannot be used: unreachable, or refusing the model listing."""


def build_requests(
    args: argparse.Namespace, chat: bool, num: int, seed: int, skip: int = 0
) -> list[BenchRequest]:
    """`num` requests of the chosen set; JSONL lines are cycled (from line `skip`) if too few."""
    if args.dataset_name in ("jsonl", "custom"):
        rows = jsonl_requests(args.dataset_path, chat, args.jsonl_output_len)
        return [rows[(skip + i) % len(rows)] for i in range(num)]
    mm = args.dataset_name == "random-mm"
    spec = RandomSpec(
        num_requests=num,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        num_images=args.random_mm_num_images if mm else (0, 0),
        buckets=args.random_mm_bucket_config if mm else None,
        image_repeat_ratio=args.image_repeat_ratio if mm else 0.0,
        chat=chat,
        tokenizer=args.tokenizer,
        video=_video_spec(args) if args.dataset_name == "random-video" else None,
    )
    return random_requests(spec, seed)


def _video_spec(args: argparse.Namespace) -> VideoSpec:
    width, height = args.random_video_size
    return VideoSpec(
        width, height, args.random_video_seconds, args.random_video_fps, args.random_video_codec
    )


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def resolve_model(base_url: str, model: str | None, headers: dict[str, str]) -> tuple[str, dict]:
    """The model to send and its /v1/models card ({} when unlisted).

    `model` wins when given (after checking that the server answers at all); otherwise the
    first listed id is used.
    """
    url = f"{base_url}/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise ServerError(
            f"cannot reach the server at {base_url} ({type(exc).__name__}: {exc}); is it running?"
        ) from None
    cards = _model_cards(response)
    if model:  # servers without a model listing still serve a named model
        return model, next((c for c in cards if c.get("id") == model), {})
    if response.status_code != 200:
        hint = " (is --api-key set?)" if response.status_code == 401 else ""
        raise ServerError(
            f"GET {url} answered HTTP {response.status_code}: "
            f"{error_message(response.text)}{hint}; or pass --model"
        )
    if not cards or "id" not in cards[0]:
        raise ServerError(f"GET {url} listed no model; pass --model")
    return str(cards[0]["id"]), cards[0]


def _model_cards(response: httpx.Response) -> list[dict]:
    try:
        data = response.json()["data"] if response.status_code == 200 else []
    except (ValueError, KeyError, TypeError):
        return []
    return [card for card in data if isinstance(card, dict)] if isinstance(data, list) else []


def _header(args: argparse.Namespace, checked: Checked, model: str, card: dict) -> dict:
    rate = args.request_rate if math.isfinite(args.request_rate) else "inf"
    return {
        "backend": checked.backend,
        "model_id": model,
        "tokenizer_id": args.tokenizer,
        "model_root": card.get("root"),
        "max_model_len": card.get("max_model_len"),
        "base_url": checked.base_url,
        "endpoint": checked.url[len(checked.base_url) :],
        "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts,
        "request_rate": rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "num_warmups": args.num_warmups,
        "goodput_slos_ms": checked.slos,
    }


def report(
    args: argparse.Namespace, checked: Checked, model: str, card: dict, outcome: RunOutcome
) -> int:
    """Print the tables, write the JSON and the plot; the exit status."""
    percentiles = args.metric_percentiles
    metrics = compute_metrics(outcome.results, outcome.duration, checked.slos, percentiles)
    line = timeline(outcome.results, outcome.duration)
    peak = max(line.output_tokens_per_s) if line.output_tokens_per_s else None
    print(format_table(metrics, args.max_concurrency, args.request_rate, percentiles, peak))
    failures = format_failures(outcome.results)
    if failures:
        print(failures)
    if outcome.server_metrics is not None:
        print(format_server_metrics(outcome.server_metrics))
    if args.save_result:
        extra = {
            "peak_output_throughput": peak,
            "timeline": line.to_dict(),
            "server_metrics": outcome.server_metrics,
            "warmup_failed": sum(not r.success for r in outcome.warmup_results),
        }
        result = build_result(_header(args, checked, model, card), metrics, outcome.results, extra)
        name = args.result_filename or default_filename(
            checked.backend, args.request_rate, args.max_concurrency, model
        )
        print(f"result written to {save_result(result, args.result_dir, name)}")
    if args.plot:
        from bench.serve.plot import save_plot

        title = f"{model}: {metrics['completed']} requests, concurrency {args.max_concurrency}"
        print(f"plot written to {save_plot(args.plot, outcome.results, line, title)}")
    return 0 if metrics["completed"] else 1


def _warn_warmups(outcome: RunOutcome) -> None:
    failed = [r for r in outcome.warmup_results if not r.success]
    if failed:
        print(
            f"warning: {len(failed)} of {len(outcome.warmup_results)} warm-up requests failed; "
            f"first error: {failed[0].error}",
            file=sys.stderr,
        )


def _check_dataset(parser: argparse.ArgumentParser, args: argparse.Namespace, chat: bool) -> None:
    try:
        jsonl_requests(args.dataset_path, chat, args.jsonl_output_len)
    except DatasetError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checked = check_args(parser, args)
    if args.dataset_name in ("jsonl", "custom"):
        _check_dataset(parser, args, checked.chat)  # a bad file is reported before any request
    headers = auth_headers(args.api_key)
    try:
        model, card = resolve_model(checked.base_url, args.model, headers)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:  # images are drawn after the server answered: thousands of them take a while
        requests = build_requests(args, checked.chat, args.num_prompts, args.seed)
        warmups = build_requests(
            args, checked.chat, args.num_warmups, args.seed + WARMUP_SEED_OFFSET
        )
    except DatasetError as exc:
        parser.error(str(exc))
    options = RequestOptions(
        url=checked.url,
        model=model,
        chat=checked.chat,
        headers=headers,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        extra_body=args.extra_body,
    )
    config = RunConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        show_progress=not args.disable_tqdm,
        metrics_urls=tuple(args.metrics_url),
        scrape_interval_s=args.metrics_interval,
    )
    num_images = sum(r.num_images for r in requests)
    print(
        f"{checked.url}  model {model}  {len(requests)} requests ({num_images} images), "
        f"rate {args.request_rate}, burstiness {args.burstiness}, "
        f"max concurrency {args.max_concurrency}",
        flush=True,
    )
    try:
        outcome = asyncio.run(run_benchmark(requests, options, config, warmups))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _warn_warmups(outcome)
    return report(args, checked, model, card, outcome)
