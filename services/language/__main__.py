"""python -m services.language --model DIR [--encode HOST:PORT,...] [...]: the language service.

Loads the text weights, the tokenizer, the chat template and the preprocessor config of a
checkpoint directory, then serves OpenAI-compatible HTTP (and, with --grpc-port, the internal
gRPC LanguageService) until SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn

from services import common
from services.language.api import APIConfig, DrainingServer, LanguageFrontend, create_app
from services.language.cli_options import (
    add_chat_arguments,
    chat_template_source,
    frontend_options,
)
from services.language.engine import AsyncEngine, EngineConfig, EngineConfigError
from services.language.frontend import FrontendOptions
from services.language.images import ImageFetchConfig, ImageLoader
from services.language.metrics import LanguageMetrics
from services.language.prompt import ChatTemplate, ContextWindow, PromptBuilder
from services.language.runner.kv_pool import KVCacheConfigError
from shared.model.config import ConfigError
from shared.model.loader import CheckpointError
from shared.wire import units
from shared.wire.errors import IncompatibleEncoderError, SecurityConfigError
from shared.wire.info import EncoderContract
from shared.wire.security import TOKEN_ENV, load_tls_files, resolve_token


class StartupError(RuntimeError):
    """A start-up problem the user can fix (a port in use, a missing directory)."""


# Start-up failures the user can fix: reported in one line, not as a traceback.
_STARTUP_ERRORS = (
    ConfigError,
    CheckpointError,
    EngineConfigError,
    FileNotFoundError,
    IncompatibleEncoderError,
    SecurityConfigError,
    StartupError,
    KVCacheConfigError,
)
_HANDSHAKE_TIMEOUT_S = 10.0
_SHUTDOWN_GRACE_S = 5.0  # after the drain: idle keep-alive connections, the gRPC server
_FATAL_EXIT_DELAY_S = 5.0

log = logging.getLogger("services.language")


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1000000' -> bytes (binary units), for argparse's `type=`."""
    return units.parse_bytes(text, argparse.ArgumentTypeError)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m services.language", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="default: the directory's name")
    p.add_argument("--encode", default="", help="encode replicas, HOST:PORT[,HOST:PORT...]")
    p.add_argument(
        "--transport",
        choices=("grpc", "nccl"),
        default="grpc",
        help="how image embeddings travel: inline in gRPC, or over a torch.distributed link",
    )
    _add_encode_client_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    p.add_argument("--grpc-port", type=int, default=None, help="serve gRPC too; 0 picks one")
    p.add_argument(
        "--api-key",
        default=os.environ.get("SPLITVL_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $SPLITVL_API_KEY)",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write {http_port, grpc_port, pid} as JSON here once serving",
    )
    images = p.add_argument_group("images")
    images.add_argument(
        "--allow-http-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only)",
    )
    images.add_argument(
        "--allowed-image-networks",
        default="",
        help="CIDRs exempt from the public-address rule, comma-separated",
    )
    images.add_argument("--max-image-bytes", type=parse_bytes, default=parse_bytes("20MiB"))
    images.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds")
    add_chat_arguments(p, images)
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-n", type=int, default=8, help="most choices per request")
    limits.add_argument("--max-request-bytes", type=parse_bytes, default=parse_bytes("64MiB"))
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default="cpu")
    engine.add_argument(
        "--dtype", type=_dtype_arg, default="auto", help="auto, float32, bfloat16 (bf16), float16"
    )
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--kv-cache-memory", type=parse_bytes, default=None)
    engine.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-queue-len", type=int, default=1024)
    engine.add_argument(
        "--max-queue-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="admission control: refuse a request at once (429 + Retry-After) "
        "when its estimated wait for a first token exceeds this; default off",
    )
    # Test hook, hidden from --help: the executor raises on these (1-based) steps.
    engine.add_argument("--inject-step-faults", type=_steps_arg, default=(), help=argparse.SUPPRESS)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs for decode steps"
    )
    parallel = p.add_argument_group("parallelism")
    parallel.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks the language model is split across (workers spawned)",
    )
    parallel.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="give each rank whole experts instead of a slice of every one",
    )
    parallel.add_argument(
        "--devices",
        default=None,
        type=_devices_arg,
        help="CUDA device indices, one per rank (e.g. 0,2); default 0..N-1",
    )
    parallel.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per rank (default: the usable cores split between the ranks)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGTERM: refuse new requests, give in-flight ones this long, end "
        "the rest with an error, exit",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _add_encode_client_args(p: argparse.ArgumentParser) -> None:
    """Fail-over and security of the calls to the encode replicas."""
    group = p.add_argument_group("encode replicas")
    group.add_argument(
        "--encode-attempt-timeout",
        type=float,
        default=15.0,
        help="seconds one attempt on one replica may take before the image is "
        "retried on another (never more than the request has left)",
    )
    group.add_argument(
        "--internal-token",
        default=os.environ.get(TOKEN_ENV),
        help="send it as x-splitvl-token metadata to the encode replicas (their "
        f"--internal-token; default: ${TOKEN_ENV})",
    )
    group.add_argument(
        "--internal-token-file",
        type=Path,
        default=None,
        help="read the internal token from this file's first line",
    )
    group.add_argument(
        "--encode-tls-ca",
        type=Path,
        default=None,
        help="connect to the encode replicas over TLS, verifying their "
        "certificates against this PEM CA",
    )
    group.add_argument(
        "--encode-tls-cert",
        type=Path,
        default=None,
        help="client certificate for mutual TLS (with --encode-tls-key)",
    )
    group.add_argument("--encode-tls-key", type=Path, default=None, help="its PEM private key")


def _devices_arg(text: str) -> tuple[str, ...]:
    try:
        return tuple(f"cuda:{int(d)}" for d in text.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--devices takes CUDA indices like 0,2; got {text!r}"
        ) from None


def _steps_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"step numbers like 3,7; got {text!r}") from None


def _dtype_arg(text: str) -> str:
    if text == "auto":
        return text
    return units.dtype_name(units.parse_dtype(text, argparse.ArgumentTypeError))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the command line."""
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_fraction=args.gpu_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queue_len=args.max_queue_len,
        dtype=args.dtype,
        device=args.device,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        expert_parallel=args.enable_expert_parallel,
        devices=args.devices,
        threads=args.threads,
        max_queue_delay_s=args.max_queue_delay,
        fault_steps=args.inject_step_faults,
    )


def image_fetch_config(args: argparse.Namespace) -> ImageFetchConfig:
    """ImageFetchConfig from the command line."""
    networks = tuple(n.strip() for n in args.allowed_image_networks.split(",") if n.strip())
    return ImageFetchConfig(
        allow_http=args.allow_http_images,
        max_image_bytes=args.max_image_bytes,
        fetch_timeout_s=args.image_fetch_timeout,
        allowed_networks=networks,
        allowed_local_media_path=args.allowed_local_media_path,
    )


def _merge_size(model_dir: Path, engine: Any) -> int:
    vision = engine.model_config.vision
    if vision is None:
        return 1
    if (model_dir / "preprocessor_config.json").is_file():
        from shared.model.processing import load_image_processor_config

        return load_image_processor_config(model_dir).merge_size
    return vision.spatial_merge_size


def _image_processor(model_dir: Path, engine: Any):
    if engine.model_config.vision is None:
        return None
    from shared.model.processing import ImageProcessorConfig, load_image_processor_config

    if (model_dir / "preprocessor_config.json").is_file():
        return load_image_processor_config(model_dir)
    return ImageProcessorConfig(merge_size=engine.model_config.vision.spatial_merge_size)


def build_frontend(
    model_dir: Path,
    engine: Any,
    encoder: Any,
    fetch: ImageFetchConfig,
    options: FrontendOptions | None = None,
    chat_template: str | None = None,
) -> LanguageFrontend:
    """Wire the chat template, tokenizer, image loader, encoder and engine together;
    `chat_template` (the source text) replaces the checkpoint's."""
    model_config = engine.model_config
    image_token_id = model_config.image_token_id if model_config.is_vl else None
    prompt_builder = PromptBuilder(
        ChatTemplate.from_model_dir(model_dir, chat_template),
        engine.tokenizer.encode,
        image_token_id,
    )
    options = options or FrontendOptions()
    policy = dataclasses.replace(options.images, processor=_image_processor(model_dir, engine))
    return LanguageFrontend(
        engine,
        prompt_builder,
        ImageLoader(fetch),
        encoder,
        ContextWindow(engine.max_model_len),
        LanguageMetrics(engine.stats),
        merge_size=_merge_size(model_dir, engine),
        options=dataclasses.replace(options, images=policy),
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} (--host/--port): {exc.strerror}; "
            "pick another port or stop what uses it"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def encoder_contract(model_dir: Path, engine: Any) -> EncoderContract:
    """What an encode replica must serve for this language service to splice its output."""
    from shared.model.fingerprint import vision_fingerprint
    from shared.model.processing import load_image_processor_config

    config = engine.model_config
    processor = load_image_processor_config(model_dir)
    return EncoderContract(
        checkpoint_id=vision_fingerprint(model_dir),
        hidden_size=config.text.hidden_size,
        num_deepstack=config.num_deepstack,
        dtype=units.dtype_name(engine.dtype),
        patch_size=processor.patch_size,
        merge_size=processor.merge_size,
        temporal_patch_size=processor.temporal_patch_size,
    )


def _build_encoder(args: argparse.Namespace, engine: Any) -> Any:
    if not args.encode:
        return None
    from services.language.encode_client import EncodeClient, EncodeClientConfig

    endpoints = tuple(e.strip() for e in args.encode.split(",") if e.strip())
    expected = encoder_contract(args.model, engine) if engine.model_config.is_vl else None
    # Built inside the running loop: the client's gRPC channels belong to it
    tls = load_tls_files(
        args.encode_tls_cert, args.encode_tls_key, args.encode_tls_ca, "--encode-tls"
    )
    return EncodeClient(
        EncodeClientConfig(
            endpoints,
            args.transport,
            args.device,
            expected=expected,
            attempt_timeout_s=args.encode_attempt_timeout,
            internal_token=resolve_token(args.internal_token, args.internal_token_file),
            tls=tls,
        )
    )


@asynccontextmanager
async def running(engine: Any, encoder: Any):
    """Start the engine (and the encode client's links) for the app's lifetime."""
    await engine.start()
    try:
        if encoder is not None and hasattr(encoder, "start"):
            await encoder.start()
        yield
    finally:
        if encoder is not None and hasattr(encoder, "close"):
            await encoder.close()
        await engine.shutdown()


async def _exit_when_fatal(engine: Any, server: uvicorn.Server, delay_s: float) -> None:
    """Once the engine cannot serve (a worker died), answer 503 for `delay_s` so clients and
    health probes see why, then stop: an orchestrator restarts the service."""
    while engine.fatal_error is None:
        await asyncio.sleep(0.25)
    log.error("the engine cannot serve (%s); exiting in %.0f s", engine.fatal_error, delay_s)
    await asyncio.sleep(delay_s)
    server.should_exit = True


def _check_port_file(port_file: Path | None) -> None:
    # Before the model loads: a typo here should not cost a minute of loading
    if port_file is not None and not port_file.parent.is_dir():
        raise StartupError(
            f"--port-file {port_file}: the directory {port_file.parent} does not exist"
        )


def _check_kv_capacity(engine: Any) -> None:
    # A pool that cannot hold one full-length sequence would refuse long requests at run time
    blocks, block_size = engine.stats().num_total_blocks, engine.config.block_size
    if blocks * block_size < engine.max_model_len:
        raise StartupError(
            f"the KV cache holds {blocks * block_size} tokens ({blocks} blocks of {block_size}), "
            f"less than one sequence of {engine.max_model_len} tokens; raise --kv-cache-memory "
            "or lower --max-model-len"
        )


async def serve(args: argparse.Namespace) -> int:
    """Load, start and serve until a signal arrives (SIGTERM drains first)."""
    options, template = frontend_options(args), chat_template_source(args.chat_template)
    fetch = image_fetch_config(args)
    _check_port_file(args.port_file)
    sock = _bind(args.host, args.port)  # a port in use fails now, not after loading
    engine = await asyncio.to_thread(AsyncEngine.from_model_dir, args.model, engine_config(args))
    _check_kv_capacity(engine)
    encoder = _build_encoder(args, engine)
    if encoder is not None:
        # Refuses to start against a replica of another model (IncompatibleEncoderError).
        await encoder.check_replicas(_HANDSHAKE_TIMEOUT_S)
    frontend = build_frontend(args.model, engine, encoder, fetch, options, template)
    name = args.served_model_name or args.model.resolve().name
    api_config = APIConfig(
        name, args.api_key, str(args.model.resolve()), args.max_n, args.max_request_bytes
    )
    app = create_app(frontend, api_config)
    config = uvicorn.Config(
        app,
        log_level=args.log_level.lower(),
        lifespan="off",
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, frontend, args.drain_timeout)
    async with running(engine, encoder):
        grpc_server, grpc_port = None, None
        if args.grpc_port is not None:
            from services.language.grpc_server import start_grpc_server

            try:
                grpc_server, grpc_port = await start_grpc_server(
                    frontend,
                    args.host,
                    args.grpc_port,
                    name,
                    args.api_key,
                    args.max_request_bytes,
                )
            except OSError as exc:
                raise StartupError(f"{exc} (--grpc-port): pick another port") from None
        watcher = asyncio.ensure_future(_exit_when_fatal(engine, server, _FATAL_EXIT_DELAY_S))
        try:
            http_port = sock.getsockname()[1]
            _announce(args.port_file, http_port, grpc_port)
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=_SHUTDOWN_GRACE_S)
    return 1 if engine.fatal_error is not None else 0


def _announce(port_file: Path | None, http_port: int, grpc_port: int | None) -> None:
    info = {"http_port": http_port, "grpc_port": grpc_port}
    log.info("language service ready: %s (pid %d)", info, os.getpid())
    if port_file is not None:
        common.write_port_file(port_file, info)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        return asyncio.run(serve(args))
    except _STARTUP_ERRORS as exc:
        log.error("cannot start the language service: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
