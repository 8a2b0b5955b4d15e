"""The language service's composition root and process lifecycle.

`serve(config)` binds the HTTP port first (a port in use fails before minutes of loading), loads
the engine, checks the KV pool and the encode replicas, wires the front end and both APIs, and
serves until a signal: SIGTERM drains (new requests 503, in-flight ones finish within the drain
timeout), a dead engine worker makes the process exit after a few seconds of answering 503 so
an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn

from services.common.errors import ConfigError, StartupError
from services.common.placement import for_service
from services.common.port_file import write_port_file
from services.language import cli
from services.language.encoder.client import EncodeClient
from services.language.engine import AsyncEngine, EngineConfigError
from services.language.frontend.images import ImageFetchConfig, ImageLoader
from services.language.frontend.metrics import LanguageMetrics
from services.language.frontend.pads import VideoMarkers
from services.language.frontend.pipeline import FrontendOptions, LanguageFrontend
from services.language.frontend.ports import ImageEncoder
from services.language.frontend.prompt import ChatTemplate, ContextWindow, PromptBuilder
from services.language.openai_api.app import create_app
from services.language.runner.kv_pool import KVCacheConfigError
from shared.kernels.cpu.allocator import keep_freed_memory
from shared.model.config import ModelConfigError
from shared.model.loader import CheckpointError
from shared.model.processing import ImageProcessorConfig, load_image_processor_config
from shared.model.video import load_video_processor_config
from shared.wire import units
from shared.wire.errors import IncompatibleEncoderError, SecurityConfigError
from shared.wire.info import EncoderContract

# Start-up failures the user can fix: reported in one line, not as a traceback.
_STARTUP_ERRORS = (
    ConfigError,
    ModelConfigError,
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


def _image_processor(model_dir: Path, engine: AsyncEngine) -> ImageProcessorConfig | None:
    vision = engine.model_config.vision
    if vision is None:
        return None
    if (model_dir / "preprocessor_config.json").is_file():
        return load_image_processor_config(model_dir)
    return ImageProcessorConfig(merge_size=vision.spatial_merge_size)


def _video_markers(engine: AsyncEngine) -> VideoMarkers | None:
    """The texts of the video placeholder's tokens, when the model and tokenizer have them."""
    cfg = engine.model_config
    ids = (cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id)
    if not cfg.is_vl or None in ids:
        return None
    texts = [engine.tokenizer.tokenizer.id_to_token(t) for t in ids]
    return None if None in texts else VideoMarkers(*texts)


def build_frontend(
    model_dir: Path,
    engine: AsyncEngine,
    encoder: ImageEncoder | None,
    fetch: ImageFetchConfig,
    options: FrontendOptions | None = None,
    chat_template: str | None = None,
) -> LanguageFrontend:
    """Wire the chat template, tokenizer, image loader, encoder and engine together;
    `chat_template` (the source text) replaces the checkpoint's."""
    model_config = engine.model_config
    image_token_id = model_config.image_token_id if model_config.is_vl else None
    markers = _video_markers(engine)
    video_token_id = model_config.video_token_id if markers is not None else None
    template = ChatTemplate.from_model_dir(model_dir, chat_template)
    prompt_builder = PromptBuilder(
        template, engine.tokenizer.encode, image_token_id, video_token_id, markers
    )
    options = options or FrontendOptions()
    processor = _image_processor(model_dir, engine)
    policy = dataclasses.replace(options.images, processor=processor)
    videos = options.videos
    if markers is not None:
        videos = dataclasses.replace(videos, processor=load_video_processor_config(model_dir))
    options = dataclasses.replace(options, videos=videos)
    return LanguageFrontend(
        engine,
        prompt_builder,
        ImageLoader(fetch),
        encoder,
        ContextWindow(engine.max_model_len),
        LanguageMetrics(engine.stats),
        merge_size=processor.merge_size if processor is not None else 1,
        options=dataclasses.replace(options, images=policy),
    )


def encoder_contract(model_dir: Path, engine: AsyncEngine) -> EncoderContract:
    """What an encode replica must serve for this language service to splice its output."""
    from shared.model.fingerprint import vision_fingerprint

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


def build_encoder(config: cli.ServiceConfig, engine: AsyncEngine) -> EncodeClient | None:
    """The encode client, checking replicas against this checkpoint's contract (VL models);
    build it inside the running loop: its gRPC channels belong to it."""
    if config.encode is None:
        return None
    expected = encoder_contract(config.model_dir, engine) if engine.model_config.is_vl else None
    return EncodeClient(dataclasses.replace(config.encode, expected=expected))


@asynccontextmanager
async def running(engine: AsyncEngine, encoder: ImageEncoder | None):
    """The engine's step loop for the app's lifetime; the encoder closed after it."""
    await engine.start()
    try:
        yield
    finally:
        if encoder is not None:
            await encoder.close()
        await engine.shutdown()


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM (or a first SIGINT) drains before exiting: new requests get
    503 while in-flight ones finish within the drain timeout (`LanguageFrontend.drain`); the
    listening socket stays open meanwhile, so clients get an answer rather than a refused
    connection. A second SIGINT exits at once."""

    def __init__(self, config: uvicorn.Config, frontend: LanguageFrontend, drain_timeout_s: float):
        super().__init__(config)
        self._frontend = frontend
        self._drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: only schedule work on the loop from here
        if self._drain is not None or self._loop is None:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        log.info("signal %d: draining for up to %g s", sig, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._frontend.drain(self._drain_timeout_s)
        finally:
            self.should_exit = True


async def _exit_when_fatal(engine: AsyncEngine, server: uvicorn.Server, delay_s: float) -> None:
    """Once the engine cannot serve (a worker died), answer 503 for `delay_s` so clients and
    health probes see why, then stop: an orchestrator restarts the service."""
    while engine.fatal_error is None:
        await asyncio.sleep(0.25)
    log.error("the engine cannot serve (%s); exiting in %.0f s", engine.fatal_error, delay_s)
    await asyncio.sleep(delay_s)
    server.should_exit = True


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


def _check_port_file(port_file: Path | None) -> None:
    # Before the model loads: a typo here should not cost a minute of loading
    if port_file is not None and not port_file.parent.is_dir():
        raise StartupError(
            f"--port-file {port_file}: the directory {port_file.parent} does not exist"
        )


def _check_kv_capacity(engine: AsyncEngine) -> None:
    # A pool that cannot hold one full-length sequence would refuse long requests at run time
    blocks, block_size = engine.stats().num_total_blocks, engine.config.block_size
    if blocks * block_size < engine.max_model_len:
        raise StartupError(
            f"the KV cache holds {blocks * block_size} tokens ({blocks} blocks of {block_size}), "
            f"less than one sequence of {engine.max_model_len} tokens; the longest that fits is "
            f"--max-model-len {blocks * block_size} (or leave the flag out to get it), or raise "
            "--kv-cache-memory"
        )


async def _start_grpc(config: cli.ServiceConfig, frontend: LanguageFrontend):
    """(server, port) of the gRPC API, or (None, None) without --grpc-port."""
    if config.listen.grpc_port is None:
        return None, None
    from services.language.grpc_api.servicer import start_grpc_server

    try:
        return await start_grpc_server(
            frontend,
            config.listen.host,
            config.listen.grpc_port,
            config.api.model_name,
            config.api.api_key,
            config.api.max_request_bytes,
        )
    except OSError as exc:
        raise StartupError(f"{exc} (--grpc-port): pick another port") from None


async def serve(config: cli.ServiceConfig) -> int:
    """Load, start and serve until a signal arrives (SIGTERM drains first)."""
    listen = config.listen
    _check_port_file(listen.port_file)
    sock = _bind(listen.host, listen.port)  # a port in use fails now, not after loading
    cores = None  # tensor-parallel ranks split the cores themselves (--threads)
    if config.engine.tensor_parallel_size == 1:
        cores = for_service("language", config.engine.device, config.engine.threads)
    engine = await asyncio.to_thread(
        AsyncEngine.from_model_dir, config.model_dir, config.engine, cores
    )
    _check_kv_capacity(engine)
    quantization = engine.config.weights_quantization(engine.model_config)
    encoder = build_encoder(config, engine)
    if encoder is not None:
        # Refuses to start against a replica of another model (IncompatibleEncoderError).
        await encoder.check_replicas(_HANDSHAKE_TIMEOUT_S)
        # The vision fingerprint covers the tower only: an FP8 copy of a checkpoint (its tower
        # unquantized, as published) shares its replicas with the original.
        weights = quantization or units.dtype_name(engine.dtype)
        log.info("encode replicas match; language weights in %s", weights)
    frontend = build_frontend(
        config.model_dir, engine, encoder, config.fetch, config.frontend, config.chat_template
    )
    app = create_app(frontend, dataclasses.replace(config.api, quantization=quantization))
    uvicorn_config = uvicorn.Config(
        app,
        log_level=config.log_level.lower(),
        lifespan="off",
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(uvicorn_config, frontend, config.drain_timeout_s)
    async with running(engine, encoder):
        grpc_server, grpc_port = await _start_grpc(config, frontend)
        watcher = asyncio.ensure_future(_exit_when_fatal(engine, server, _FATAL_EXIT_DELAY_S))
        try:
            _announce(listen.port_file, sock.getsockname()[1], grpc_port)
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
        write_port_file(port_file, info)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the command line, then serve; a start-up error is one line and exit 1."""
    args = cli.build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.device.split(":")[0] == "cpu":
        keep_freed_memory()  # before the serving threads start
    try:
        return asyncio.run(serve(cli.service_config(args)))
    except _STARTUP_ERRORS as exc:
        log.error("cannot start the language service: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
