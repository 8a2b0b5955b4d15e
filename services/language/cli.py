"""The language service's command line: every flag, turned into frozen configs once.

`parse_args(argv)` gives a `ServiceConfig`; nothing after it reads the argparse namespace.
Values are checked here where a flag alone decides them (one line naming the flag at start-up);
what depends on the loaded checkpoint is checked by `server`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.argtypes import byte_size, mm_limit_arg
from services.common.errors import ConfigError
from services.language.encoder.config import TRANSPORTS, EncodeClientConfig
from services.language.engine import EngineConfig
from services.language.engine_flags import add_engine_args, engine_config
from services.language.frontend.image_policy import ImagePolicy
from services.language.frontend.images import ImageFetchConfig
from services.language.frontend.pipeline import FrontendOptions
from services.language.frontend.video_policy import VideoPolicy
from services.language.openai_api.app import APIConfig
from services.language.parsers.reasoning import REASONING_PARSERS
from services.language.parsers.tool_calls import TOOL_CALL_PARSERS, ToolConfig
from shared.wire.security import TOKEN_ENV, load_tls_files, resolve_token


@dataclass(frozen=True)
class ListenConfig:
    """Where the service listens and announces itself."""

    host: str = "127.0.0.1"
    port: int = 8000  # HTTP; 0 picks a free one
    grpc_port: int | None = None  # None: no gRPC API
    port_file: Path | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `python -m services.language` runs with."""

    model_dir: Path
    engine: EngineConfig
    api: APIConfig
    listen: ListenConfig
    fetch: ImageFetchConfig
    frontend: FrontendOptions
    chat_template: str | None  # source text replacing the checkpoint's template
    encode: EncodeClientConfig | None  # None: text only (no encode replica)
    drain_timeout_s: float = 30.0
    log_level: str = "INFO"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m services.language",
        description="The language service: OpenAI-compatible HTTP (and, with --grpc-port, the "
        "internal gRPC LanguageService) over a checkpoint's language model, until SIGINT or "
        "SIGTERM.",
    )
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="default: the directory's name")
    p.add_argument("--encode", default="", help="encode replicas, HOST:PORT[,HOST:PORT...]")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="grpc",
        help="how image embeddings travel: inline in gRPC (grpc), over a torch.distributed "
        "link (nccl), through shared memory with a replica on this host (ipc), or ipc where "
        "the device is a CPU and grpc elsewhere (auto)",
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
    _add_image_args(p)
    _add_chat_args(p)
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-n", type=int, default=8, help="most choices per request")
    limits.add_argument("--max-request-bytes", type=byte_size, default="64MiB")
    add_engine_args(p)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGTERM: refuse new requests, give in-flight ones this long, end the rest "
        "with an error, exit",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _add_encode_client_args(p: argparse.ArgumentParser) -> None:
    """Fail-over and security of the calls to the encode replicas."""
    group = p.add_argument_group("encode replicas")
    group.add_argument(
        "--ipc-pool-memory",
        type=byte_size,
        default="256MiB",
        help="the shared-memory pool per encode replica of --transport ipc",
    )
    group.add_argument(
        "--encode-attempt-timeout",
        type=float,
        default=15.0,
        help="seconds one attempt on one replica may take before the image is retried on "
        "another (never more than the request has left)",
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
        help="connect to the encode replicas over TLS, verifying their certificates against "
        "this PEM CA",
    )
    group.add_argument(
        "--encode-tls-cert",
        type=Path,
        default=None,
        help="client certificate for mutual TLS (with --encode-tls-key)",
    )
    group.add_argument("--encode-tls-key", type=Path, default=None, help="its PEM private key")


def _add_image_args(p: argparse.ArgumentParser) -> None:
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
    images.add_argument("--max-image-bytes", type=byte_size, default="20MiB")
    images.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds")
    images.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="serve file:// image URLs from inside DIR (off by default)",
    )
    images.add_argument(
        "--limit-mm-per-prompt",
        type=mm_limit_arg,
        default=None,
        metavar="JSON",
        help='most images and videos per prompt, e.g. \'{"image": 4, "video": 1}\'',
    )
    images.add_argument(
        "--no-overlap",
        action="store_true",
        help="encode every image of a request before it enters the engine (by default it enters "
        "at once, laid out from the files' headers, and computes its text while they encode)",
    )
    images.add_argument(
        "--max-video-bytes", type=byte_size, default="128MiB", help="largest video file accepted"
    )


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    chat = p.add_argument_group("chat")
    chat.add_argument(
        "--chat-template",
        default=None,
        metavar="PATH",
        help="a Jinja chat template file to use instead of the checkpoint's",
    )
    chat.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="parse <tool_call> blocks of the output into tool_calls (qwen3 and hermes are the "
        "same format)",
    )
    chat.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    chat.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split <think>...</think> into reasoning_content",
    )


def image_fetch_config(args: argparse.Namespace) -> ImageFetchConfig:
    """ImageFetchConfig from the command line."""
    networks = tuple(n.strip() for n in args.allowed_image_networks.split(",") if n.strip())
    try:
        return ImageFetchConfig(
            allow_http=args.allow_http_images,
            max_image_bytes=args.max_image_bytes,
            fetch_timeout_s=args.image_fetch_timeout,
            allowed_networks=networks,
            allowed_local_media_path=args.allowed_local_media_path,
            max_video_bytes=args.max_video_bytes,
        )
    except ValueError as exc:
        raise ConfigError(f"image flags: {exc}") from None


def frontend_options(args: argparse.Namespace) -> FrontendOptions:
    """FrontendOptions from the command line (the server adds the model's image processor)."""
    try:
        tools = ToolConfig(args.tool_call_parser, args.enable_auto_tool_choice)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    limits = args.limit_mm_per_prompt or {}
    images = ImagePolicy(None, limits.get("image"))
    videos = VideoPolicy(None, limits.get("video"))
    return FrontendOptions(args.reasoning_parser, tools, images, videos, not args.no_overlap)


def chat_template_source(value: str | None) -> str | None:
    """--chat-template: a file's text, or (as vLLM allows) the template itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file")


def encode_client_config(args: argparse.Namespace) -> EncodeClientConfig | None:
    """The encode client's config without the contract the replicas must meet (the server
    derives it from the loaded checkpoint); None without --encode."""
    endpoints = tuple(e.strip() for e in args.encode.split(",") if e.strip())
    if not endpoints:
        return None
    tls = load_tls_files(
        args.encode_tls_cert, args.encode_tls_key, args.encode_tls_ca, "--encode-tls"
    )
    return EncodeClientConfig(
        endpoints,
        args.transport,
        args.device,
        attempt_timeout_s=args.encode_attempt_timeout,
        ipc_pool_bytes=args.ipc_pool_memory,
        internal_token=resolve_token(args.internal_token, args.internal_token_file),
        tls=tls,
    )


def service_config(args: argparse.Namespace) -> ServiceConfig:
    """The frozen configs of a parsed command line; ConfigError, SecurityConfigError or
    FileNotFoundError name a bad value."""
    name = args.served_model_name or args.model.resolve().name
    try:
        api = APIConfig(
            name, args.api_key, str(args.model.resolve()), args.max_n, args.max_request_bytes
        )
    except ValueError as exc:
        raise ConfigError(f"--max-n / --max-request-bytes: {exc}") from None
    return ServiceConfig(
        model_dir=args.model,
        engine=engine_config(args),
        api=api,
        listen=ListenConfig(args.host, args.port, args.grpc_port, args.port_file),
        fetch=image_fetch_config(args),
        frontend=frontend_options(args),
        chat_template=chat_template_source(args.chat_template),
        encode=encode_client_config(args),
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
    )


def parse_args(argv: list[str] | None = None) -> ServiceConfig:
    """The command line -> ServiceConfig (argparse exits 2 on a malformed flag)."""
    return service_config(build_parser().parse_args(argv))
