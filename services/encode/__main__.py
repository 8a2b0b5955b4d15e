"""python -m services.encode --model DIR [--host H] [--port P] [...]: run one encode replica."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from services.common.argtypes import byte_size, dtype_choice
from services.common.errors import ConfigError
from services.encode.config import EncodeLimits, EncodeServiceConfig
from shared.wire.security import TOKEN_ENV, load_tls_files, resolve_token
from shared.wire.units import parse_dtype


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.encode", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--dtype",
        type=dtype_choice,
        default="auto",
        help="auto (the checkpoint's; float32 on a CPU without native bf16), float32, bfloat16, "
        "float16",
    )
    p.add_argument(
        "--max-batch-patches",
        type=int,
        default=16384,
        help="patches per vision forward (an image larger than this runs alone)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="how long a partial batch waits for more images (default 0)",
    )
    p.add_argument(
        "--cache-memory", type=byte_size, default="1GiB", help="embedding cache budget, e.g. 512MiB"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics over HTTP on this port (0 picks one)",
    )
    p.add_argument("--max-image-bytes", type=byte_size, default="32MiB")
    p.add_argument("--max-images-per-request", type=int, default=32)
    p.add_argument(
        "--max-decoded-pixels",
        type=int,
        default=8192 * 8192,
        help="refuse images whose header claims more pixels (decompression bombs)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="ceiling for a request's max_pixels (default: preprocessor_config.json)",
    )
    p.add_argument("--max-queue-images", type=int, default=512)
    p.add_argument("--max-video-bytes", type=byte_size, default="256MiB")
    p.add_argument(
        "--max-video-seconds", type=float, default=1200.0, help="longest clip accepted (20 min)"
    )
    p.add_argument(
        "--max-video-frames", type=int, default=768, help="most frames sampled from one clip"
    )
    p.add_argument(
        "--video-decode-timeout", type=float, default=60.0, help="seconds to decode one clip"
    )
    p.add_argument(
        "--allow-url-fetch",
        action="store_true",
        help="fetch http(s) image URLs, public addresses only (data: URLs are always accepted)",
    )
    p.add_argument(
        "--allowed-fetch-networks",
        default="",
        help="CIDRs exempt from the public-address rule of --allow-url-fetch, comma-separated",
    )
    p.add_argument("--chunk-bytes", type=byte_size, default="1MiB", help="inline tensor chunk size")
    p.add_argument("--preprocess-workers", type=int, default=2)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, after SIGTERM")
    p.add_argument(
        "--ticket-ttl",
        type=float,
        default=60.0,
        help="seconds a link transfer waits to be redeemed",
    )
    p.add_argument("--link-timeout", type=float, default=60.0)
    p.add_argument("--advertise-host", default=None, help="address link peers connect to")
    p.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write {port, metrics_port, pid} as JSON here once bound",
    )
    p.add_argument(
        "--max-links",
        type=int,
        default=64,
        help="links open or waiting for their peer at once (OpenLink beyond: RESOURCE_EXHAUSTED)",
    )
    security = p.add_argument_group("security (see README: which ports to keep private)")
    security.add_argument(
        "--internal-token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require metadata x-splitvl-token: TOKEN on every RPC but health (default: "
        f"${TOKEN_ENV}); prefer --internal-token-file, command lines are visible to other users",
    )
    security.add_argument(
        "--internal-token-file",
        type=Path,
        default=None,
        help="read the internal token from this file's first line",
    )
    security.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="serve gRPC over TLS with this PEM certificate (chain)",
    )
    security.add_argument("--tls-key", type=Path, default=None, help="its PEM private key")
    security.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this PEM CA (mutual TLS)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> EncodeServiceConfig:
    """The frozen config; ConfigError / SecurityConfigError (ValueErrors) name a bad value."""
    tls = load_tls_files(args.tls_cert, args.tls_key, args.tls_ca, "--tls")
    if tls is not None and tls.cert is None:
        raise ConfigError("--tls-ca needs --tls-cert and --tls-key (the server's own pair)")
    limits = EncodeLimits(
        max_image_bytes=args.max_image_bytes,
        max_decoded_pixels=args.max_decoded_pixels,
        max_images_per_request=args.max_images_per_request,
        max_queue_images=args.max_queue_images,
        max_pixels=args.max_pixels,
        max_video_bytes=args.max_video_bytes,
        max_video_seconds=args.max_video_seconds,
        max_video_frames=args.max_video_frames,
        video_decode_timeout_s=args.video_decode_timeout,
        allow_url_fetch=args.allow_url_fetch,
        allowed_fetch_networks=tuple(
            n.strip() for n in args.allowed_fetch_networks.split(",") if n.strip()
        ),
    )
    return EncodeServiceConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=None if args.dtype == "auto" else parse_dtype(args.dtype),
        max_batch_patches=args.max_batch_patches,
        batch_wait_s=args.batch_wait_ms / 1000,
        cache_bytes=args.cache_memory,
        metrics_port=args.metrics_port,
        limits=limits,
        chunk_bytes=args.chunk_bytes,
        preprocess_workers=args.preprocess_workers,
        drain_timeout_s=args.drain_timeout,
        ticket_ttl_s=args.ticket_ttl,
        link_timeout_s=args.link_timeout,
        advertise_host=args.advertise_host,
        port_file=args.port_file,
        internal_token=resolve_token(args.internal_token, args.internal_token_file),
        tls=tls,
        max_links=args.max_links,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        # One line, no usage text: the value is wrong, not the syntax.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    # Imported only now: the serving stack takes seconds to import, a bad flag should not wait.
    from services.encode.lifecycle import serve
    from shared.kernels.cpu.allocator import keep_freed_memory

    if config.device.split(":")[0] == "cpu":
        keep_freed_memory()  # before the serving threads start
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
