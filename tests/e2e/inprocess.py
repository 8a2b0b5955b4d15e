"""Running the language HTTP app inside the test process, on a real socket, for API tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from services.language.engine import AsyncEngine, EngineConfig
from services.language.frontend.images import ImageFetchConfig
from services.language.frontend.pipeline import FrontendOptions
from services.language.openai_api.app import APIConfig, create_app
from services.language.server import build_frontend, running

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class InProcessServer:
    """A uvicorn server on 127.0.0.1:<free port> in a thread, with its frontend exposed."""

    def __init__(self, app, frontend) -> None:
        self.app = app
        self.frontend = frontend
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan="on", log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process language server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT_S)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("the in-process language server did not stop")


@contextmanager
def language_server(
    model_dir: Path,
    encoder=None,
    engine_config: EngineConfig | None = None,
    api_key: str | None = None,
    fetch: ImageFetchConfig | None = None,
    model_name: str = "tiny",
    max_request_bytes: int = 64 * 2**20,
    options: FrontendOptions | None = None,
    chat_template: str | None = None,
) -> Iterator[InProcessServer]:
    """Serve `model_dir` with a real engine for the duration of the block (front-end
    `options` and a replacement `chat_template` as the service's flags would set them)."""
    config = engine_config or EngineConfig(kv_cache_memory=8 * 2**20, max_model_len=512)
    engine = AsyncEngine.from_model_dir(model_dir, config)
    frontend = build_frontend(
        model_dir, engine, encoder, fetch or ImageFetchConfig(), options, chat_template
    )
    app = create_app(
        frontend,
        APIConfig(model_name, api_key=api_key, max_request_bytes=max_request_bytes),
        lifespan=lambda _app: running(engine, encoder),
    )
    server = InProcessServer(app, frontend)
    server.start()
    try:
        yield server
    finally:
        server.stop()
