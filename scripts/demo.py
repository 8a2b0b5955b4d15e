"""Run the small shapes model as two services and ask it questions through the OpenAI client.

    make demo     # = .venv/bin/python -m scripts.demo [--model DIR] [-n 8]
    make serve    # = .venv/bin/python -m scripts.demo serve [--encode-port 50051] ...

`demo` starts the encode and language services on 127.0.0.1 (free ports, read back from their
port files), streams greedy answers to held-out questions about generated images and mp4 clips,
prints each answer next to the expected one with its time to first token, then stops both
services.
`serve` starts both on fixed ports and leaves them running, logging to the terminal, until
Ctrl-C. Either way the services are stopped with SIGTERM, then SIGKILL after a timeout, also on
errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from scripts.shapes_vl.chat import chat_messages, video_messages
from scripts.testkit.launch import (
    REPO,
    ServiceError,
    ServiceProcess,
    wait_grpc_serving,
    wait_http_healthy,
)

DEFAULT_MODEL = REPO / "models" / "shapes-vl"
FP8_CACHE = REPO / ".cache" / "fp8"  # --fp8 copies (git-ignored), rewritten when the source changes
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 120.0
MODEL_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors")
# The engine settings the demo needs: short prompts, a small KV cache that fits any laptop.
LANGUAGE_ARGS = ("--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--max-num-seqs", "32")


def check_model_dir(model_dir: Path) -> None:
    """Raise ServiceError naming what is missing from a servable shapes checkpoint."""
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ServiceError(
            f"{model_dir} lacks {', '.join(missing)}; pass --model DIR, or train one with "
            f"'.venv/bin/python -m scripts.shapes_vl.train --out {model_dir}'"
        )
    with open(model_dir / "model.safetensors", "rb") as f:
        if f.read(40).startswith(b"version https://git-lfs"):
            raise ServiceError(
                f"{model_dir}/model.safetensors is a Git LFS pointer; run 'git lfs pull' first"
            )


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how the two services run. Port 0 picks a free port."""

    model_dir: Path
    workdir: Path
    host: str = "127.0.0.1"
    encode_port: int = 0
    http_port: int = 0
    grpc_port: int | None = None
    transport: str = "grpc"
    api_key: str | None = None
    model_name: str | None = None  # None: the checkpoint directory's name
    log_to_files: bool = True
    # Intra-op threads per service; None inherits the environment. The small model's matrices
    # are tiny: with several threads per process, OpenMP spin-waiting on a busy machine makes a
    # forward many times slower, so the demo and the evaluation use one unless
    # OMP_NUM_THREADS says otherwise.
    threads: int | None = None

    def service_env(self) -> dict[str, str]:
        """Environment additions for each service process."""
        if self.threads is None or "OMP_NUM_THREADS" in os.environ:
            return {}
        return {"OMP_NUM_THREADS": str(self.threads)}


@dataclass(frozen=True)
class Cluster:
    """The addresses of a running encode replica and language service."""

    base_url: str
    encode_address: str
    grpc_address: str | None
    model_name: str
    api_key: str | None
    services: tuple[ServiceProcess, ...]

    def exited(self) -> list[str]:
        """Names of the services whose process has ended."""
        return [s.name for s in self.services if not s.alive()]


@contextmanager
def running_cluster(cfg: ClusterConfig) -> Iterator[Cluster]:
    """Start encode, wait until SERVING, start language, wait until healthy; stop both after."""
    check_model_dir(cfg.model_dir)
    model_name = cfg.model_name or cfg.model_dir.name
    with ExitStack() as stack:
        enc_args = [
            "--model",
            str(cfg.model_dir),
            "--host",
            cfg.host,
            "--port",
            str(cfg.encode_port),
        ]
        encode = ServiceProcess(
            "encode", enc_args, cfg.workdir, cfg.log_to_files, cfg.service_env(), new_session=True
        )
        stack.callback(encode.stop)
        encode_address = f"{cfg.host}:{encode.ports(START_TIMEOUT_S)['port']}"
        wait_grpc_serving(encode_address, START_TIMEOUT_S, process=encode)
        lang_args = [
            "--model",
            str(cfg.model_dir),
            "--host",
            cfg.host,
            "--port",
            str(cfg.http_port),
            "--encode",
            encode_address,
            "--transport",
            cfg.transport,
            "--served-model-name",
            model_name,
            *LANGUAGE_ARGS,
        ]
        if cfg.grpc_port is not None:
            lang_args += ["--grpc-port", str(cfg.grpc_port)]
        if cfg.api_key:
            lang_args += ["--api-key", cfg.api_key]
        language = ServiceProcess(
            "language",
            lang_args,
            cfg.workdir,
            cfg.log_to_files,
            cfg.service_env(),
            new_session=True,
        )
        # ExitStack unwinds in reverse: language stops before the encode replica it calls.
        stack.callback(language.stop)
        ports = language.ports(START_TIMEOUT_S)
        base_url = f"http://{cfg.host}:{ports['http_port']}"
        wait_http_healthy(base_url, START_TIMEOUT_S, process=language)
        grpc_address = f"{cfg.host}:{ports['grpc_port']}" if ports.get("grpc_port") else None
        yield Cluster(
            base_url, encode_address, grpc_address, model_name, cfg.api_key, (encode, language)
        )


def stream_answer(client, model_name: str, messages: list[dict], echo: bool) -> tuple[str, float]:
    """Stream one greedy answer; returns (text, seconds to the first content token)."""
    start = time.monotonic()
    first = None
    text = ""
    stream = client.chat.completions.create(
        model=model_name,
        messages=messages,
        stream=True,
        temperature=0,
        max_tokens=32,
    )
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta.content or ""
            if delta and first is None:
                first = time.monotonic() - start
            text += delta
            if echo:
                print(delta, end="", flush=True)
    return text, first if first is not None else time.monotonic() - start


def run_demo(args: argparse.Namespace) -> int:
    """Ask args.n held-out questions and print answers, expectations and timings."""
    import openai

    from scripts.shapes_vl.data import make_dataset
    from scripts.shapes_vl.evaluate import HELD_OUT_SEED
    from scripts.shapes_vl.video_data import make_video_dataset
    from scripts.shapes_vl.video_eval import HELD_OUT_VIDEO_SEED

    questions = [
        (f"{ex.image.size[0]}x{ex.image.size[1]} image", ex, chat_messages(ex.image, ex.question))
        for ex in make_dataset(HELD_OUT_SEED if args.seed is None else args.seed, args.n)
    ]
    clips = make_video_dataset(HELD_OUT_VIDEO_SEED if args.seed is None else args.seed, args.videos)
    questions += [
        (f"{ex.clip.num_frames / ex.clip.fps:.1f} s clip", ex, video_messages(ex.data, ex.question))
        for ex in clips
    ]
    api_key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="splitvl-demo-") as tmp:
        cfg = ClusterConfig(
            args.model.resolve(), Path(tmp), api_key=api_key, transport=args.transport, threads=1
        )
        print(f"starting encode + language services for {cfg.model_dir} ...", flush=True)
        t0 = time.monotonic()
        with running_cluster(cfg) as cluster:
            print(
                f"ready in {time.monotonic() - t0:.1f} s: {cluster.base_url}/v1 "
                f"(encode at {cluster.encode_address}, transport {args.transport})\n"
            )
            client = openai.OpenAI(
                base_url=f"{cluster.base_url}/v1",
                api_key=api_key,
                max_retries=0,
                timeout=REQUEST_TIMEOUT_S,
            )
            correct, ttfts = 0, []
            for i, (what, ex, messages) in enumerate(questions, 1):
                print(f"[{i}/{len(questions)}] {what}, {ex.kind} question")
                print(f"  Q: {ex.question}\n  A: ", end="", flush=True)
                answer, ttft = stream_answer(client, cluster.model_name, messages, echo=True)
                ok = answer == ex.answer
                correct += ok
                ttfts.append(ttft)
                print(
                    f"\n  expected: {ex.answer}  -> {'match' if ok else 'MISMATCH'}"
                    f"  (first token after {ttft * 1000:.0f} ms)\n",
                    flush=True,
                )
            print(
                f"accuracy: {correct}/{len(questions)} exact "
                f"({correct / max(1, len(questions)):.0%}), "
                f"median time to first token {sorted(ttfts)[len(ttfts) // 2] * 1000:.0f} ms"
            )
            print("stopping the services ...", flush=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Serve on fixed ports until Ctrl-C (or until a service exits)."""
    with tempfile.TemporaryDirectory(prefix="splitvl-serve-") as tmp:
        cfg = ClusterConfig(
            args.model.resolve(),
            Path(tmp),
            host=args.host,
            encode_port=args.encode_port,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            transport=args.transport,
            api_key=args.api_key,
            log_to_files=False,
        )
        with running_cluster(cfg) as cluster:
            auth = f' -H "Authorization: Bearer {args.api_key}"' if args.api_key else ""
            print(
                f"\nserving {cluster.model_name}:\n"
                f"  OpenAI HTTP   {cluster.base_url}/v1\n"
                f"  language gRPC {cluster.grpc_address}\n"
                f"  encode gRPC   {cluster.encode_address}\n"
                f"try: curl -s {cluster.base_url}/v1/chat/completions{auth} "
                "-H 'Content-Type: application/json' -d '{\"model\": "
                f'"{cluster.model_name}", "messages": [{{"role": "user", '
                '"content": "How many shapes are there?"}]}\'\n'
                "Ctrl-C stops both services.",
                flush=True,
            )
            # Serving has no deadline: the loop ends on Ctrl-C / SIGTERM or when a service dies.
            while not cluster.exited():
                time.sleep(0.5)
            print(f"{', '.join(cluster.exited())} exited; stopping the services", flush=True)
            return 1


def build_parser() -> argparse.ArgumentParser:
    """The command line: `demo` (default) or `serve`."""
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", choices=("demo", "serve"), default="demo")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="shapes-style checkpoint")
    p.add_argument(
        "--fp8",
        action="store_true",
        help="serve a block FP8 copy of --model (scripts.quantize_fp8 writes it under .cache/fp8)",
    )
    p.add_argument(
        "--transport",
        choices=("grpc", "nccl"),
        default="grpc",
        help="how image embeddings travel to the language service",
    )
    demo = p.add_argument_group("demo")
    demo.add_argument("-n", type=int, default=8, help="number of image questions")
    demo.add_argument("--videos", type=int, default=2, help="number of questions about clips")
    demo.add_argument("--seed", type=int, default=None, help="data seed (default: held-out)")
    serve = p.add_argument_group("serve")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--encode-port", type=int, default=50051)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SPLITVL_API_KEY"),
        help="require this bearer token (default: $SPLITVL_API_KEY)",
    )
    return p


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 1 with a one-line reason when a service fails."""
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit("-n must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so the services are stopped either way; SIGINT is set
    # explicitly because a shell starting this in the background would have it ignored.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    if args.fp8:
        from scripts.quantize_fp8 import cached_copy

        check_model_dir(args.model)
        args.model = cached_copy(args.model, FP8_CACHE)
        print(f"block FP8 copy: {args.model}", flush=True)
    try:
        return run_serve(args) if args.command == "serve" else run_demo(args)
    except KeyboardInterrupt:
        print("\ninterrupted; services stopped", file=sys.stderr)
        return 130
    except (ServiceError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
