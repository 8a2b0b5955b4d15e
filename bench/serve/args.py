"""Command-line flags, named as `vllm bench serve` names them where it has them."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

from bench.serve.datasets import DatasetError, parse_buckets, parse_count_range
from bench.serve.metrics import parse_goodput
from bench.serve.videos import parse_video_size

# custom: vLLM's name for a JSONL file; random-video: one generated clip per request
DATASETS = ("random", "random-mm", "random-video", "jsonl", "custom")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _dataset_arg(parse):
    """A parser of the dataset module as an argparse type (its errors become usage errors)."""

    def convert(text: str):
        try:
            return parse(text)
        except DatasetError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


_buckets = _dataset_arg(parse_buckets)
_count_range = _dataset_arg(parse_count_range)
_video_size = _dataset_arg(parse_video_size)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad percentiles {text!r}; use e.g. 90,99") from None
    if not values or any(not 0 < p < 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100), got {text!r}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description="Streamed load against an OpenAI-compatible server (splitvl, vLLM, SGLang).",
    )
    server = p.add_argument_group("server")
    server.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (default: --host/--port)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=_positive_int, default=8000)
    server.add_argument(
        "--endpoint",
        default="/v1/chat/completions",
        help="/v1/chat/completions (default) or /v1/completions",
    )
    server.add_argument(
        "--backend",
        default=None,
        help="label for the result (default: openai-chat or openai by endpoint)",
    )
    server.add_argument("--model", help="model name to send (default: GET /v1/models data[0].id)")
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    server.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        help="seconds one request may take, stream included (default 600)",
    )

    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", type=_positive_int, default=1000)
    load.add_argument(
        "--request-rate",
        type=_positive_float,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf (default) sends all at once",
    )
    load.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 steadier",
    )
    load.add_argument("--max-concurrency", type=_positive_int, default=None)
    load.add_argument(
        "--num-warmups",
        type=_non_negative_int,
        default=0,
        help="untimed requests sent first (their images are not reused later)",
    )
    load.add_argument("--seed", type=int, default=0)

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send vLLM's ignore_eos so every request runs to its max_tokens",
    )
    sampling.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        help="JSON object merged into every request body",
    )

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random-mm")
    data.add_argument("--dataset-path", help="the JSONL file of --dataset-name jsonl")
    data.add_argument(
        "--jsonl-output-len",
        "--custom-output-len",
        dest="jsonl_output_len",
        type=_positive_int,
        default=None,
        help="max_tokens for JSONL lines that do not set one",
    )
    data.add_argument("--random-input-len", type=_positive_int, default=1024)
    data.add_argument("--random-output-len", type=_positive_int, default=128)
    data.add_argument(
        "--random-range-ratio",
        type=_ratio,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)]",
    )
    data.add_argument(
        "--random-mm-num-images",
        type=_count_range,
        default=(1, 1),
        help="images per request: N or MIN-MAX (default 1)",
    )
    data.add_argument(
        "--random-mm-bucket-config",
        type=_buckets,
        default=parse_buckets("256x256:0.5,1280x720:0.5"),
        help="image sizes WxH:weight,... (default 256x256:0.5,1280x720:0.5)",
    )
    data.add_argument(
        "--random-video-size", type=_video_size, default=(320, 240), help="WxH (default 320x240)"
    )
    data.add_argument("--random-video-seconds", type=_positive_float, default=4.0)
    data.add_argument("--random-video-fps", type=_positive_float, default=8.0)
    data.add_argument(
        "--random-video-codec",
        choices=("libx264", "libvpx-vp9", "gif"),
        default="libx264",
        help="mp4 (h264), webm (vp9) or gif",
    )
    data.add_argument(
        "--image-repeat-ratio",
        type=_ratio,
        default=0.0,
        help="fraction of requests that reuse an image sent before",
    )
    data.add_argument(
        "--tokenizer",
        help="tokenizer.json (or its folder) to cut random text to "
        "exact token counts; default: one word per token",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs, e.g. ttft:500 tpot:50 e2el:5000",
    )
    out.add_argument(
        "--metric-percentiles",
        type=_percentiles,
        default=(90, 99),
        help="comma-separated percentiles to report (default 90,99)",
    )
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument("--plot", metavar="FILE.png", help="write latency CDFs and a timeline")
    out.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        help="Prometheus endpoint to scrape during the run (repeatable)",
    )
    out.add_argument(
        "--metrics-interval",
        type=_positive_float,
        default=1.0,
        help="seconds between scrapes (default 1)",
    )
    out.add_argument("--disable-tqdm", action="store_true")
    return p


@dataclass(frozen=True)
class Checked:
    """What validation derives from the flags."""

    base_url: str
    url: str
    chat: bool
    backend: str
    slos: dict[str, float] | None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Checked:
    """Cross-flag checks; each failure is a one-line argparse error (exit status 2)."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        parser.error(f"--base-url must start with http:// or https://, got {base_url!r}")
    endpoint = "/" + args.endpoint.lstrip("/")
    if base_url.endswith("/v1") and endpoint.startswith("/v1/"):
        base_url = base_url[: -len("/v1")]  # an OpenAI-client style base URL
    chat = endpoint.endswith("/chat/completions")
    if not chat and not endpoint.endswith("/completions"):
        parser.error(f"--endpoint must end in /chat/completions or /completions, got {endpoint}")
    if args.dataset_name in ("random-mm", "random-video") and not chat:
        parser.error(
            f"--dataset-name {args.dataset_name} sends images or videos; use --endpoint "
            "/v1/chat/completions"
        )
    if args.dataset_name in ("jsonl", "custom") and not args.dataset_path:
        parser.error(f"--dataset-name {args.dataset_name} needs --dataset-path FILE")
    if args.dataset_path and args.dataset_name not in ("jsonl", "custom"):
        parser.error("--dataset-path is read only with --dataset-name jsonl")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"--plot writes a PNG; give a FILE.png, got {args.plot!r}")
    for url in args.metrics_url:
        if not url.startswith(("http://", "https://")):
            parser.error(f"--metrics-url must start with http:// or https://, got {url!r}")
    try:
        slos = parse_goodput(args.goodput) if args.goodput else None
    except ValueError as exc:
        parser.error(str(exc))
    backend = args.backend or ("openai-chat" if chat else "openai")
    return Checked(base_url, base_url + endpoint, chat, backend, slos)
