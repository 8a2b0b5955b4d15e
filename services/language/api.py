"""The OpenAI-compatible HTTP app (FastAPI) over the language front end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.language.errors import BadRequestError, NotFoundError
from services.language.frontend import LanguageFrontend
from services.language.http_errors import RequestGate, install_error_handlers
from services.language.metrics import CONTENT_TYPE
from services.language.openai_responses import ResponseBuilder, collect_response, stream_events
from services.language.openai_schemas import ChatCompletionRequest, CompletionRequest
from services.language.request import GenerationRequest


@dataclass(frozen=True)
class APIConfig:
    """HTTP-level settings: the served model name, the API key, request limits."""

    model_name: str
    api_key: str | None = None
    model_root: str | None = None  # the checkpoint path, reported as /v1/models "root"
    max_n: int = 8
    max_request_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_n < 1 or self.max_request_bytes < 1:
            raise ValueError("max_n and max_request_bytes must be positive")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone()
    return task.result()


class _ClientGone(Exception):
    """The client disconnected; nothing is left to answer."""


def create_app(frontend: LanguageFrontend, config: APIConfig, lifespan=None) -> FastAPI:
    """The OpenAI-compatible HTTP app around a frontend."""
    app = FastAPI(
        title="splitvl language service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.frontend = frontend
    install_error_handlers(app, lambda error: frontend.metrics.rejected(error.status_code))
    app.add_middleware(
        RequestGate, api_key=config.api_key, max_request_bytes=config.max_request_bytes
    )
    created = int(time.time())

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created,
                "owned_by": "splitvl", "root": config.model_root or config.model_name,
                "parent": None, "max_model_len": frontend.window.max_model_len}  # fmt: skip

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise NotFoundError(
                f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_n(n: int) -> None:
        if not 1 <= n <= config.max_n:
            raise BadRequestError(f"n must be in [1, {config.max_n}], got {n}", param="n")

    @app.get("/health")
    async def health() -> Response:
        serving, reason = frontend.engine.health()
        if serving:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_model(body.model)
        check_n(body.n)
        logprobs = body.logprobs_count()
        requested = body.requested_max_tokens()
        # Validate sampling before any image is fetched or encoded
        sampling = body.sampling_params(requested if requested is not None else 1, logprobs)
        messages = body.chat_messages()
        options = body.response_options(logprobs)
        builder = ResponseBuilder("chat", config.model_name, options, frontend.token_text)

        async def prepare() -> tuple[list[GenerationRequest], int]:
            prompt = await frontend.prepare_chat(messages, builder.id)
            requests = frontend.make_requests(
                builder.id, prompt, sampling, requested, body.n, arrival
            )
            return requests, prompt.num_image_tokens

        return await _run(request, body.stream, builder, prepare)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_model(body.model)
        check_n(body.n)
        logprobs = body.logprobs_count()
        requested = body.max_tokens
        sampling = body.sampling_params(requested if requested is not None else 1, logprobs)
        prompt_input = body.single_prompt()
        options = body.response_options(logprobs)
        builder = ResponseBuilder("text", config.model_name, options, frontend.token_text)

        async def prepare() -> tuple[list[GenerationRequest], int]:
            prompt = await asyncio.to_thread(frontend.prepare_text, prompt_input)
            requests = frontend.make_requests(
                builder.id, prompt, sampling, requested, body.n, arrival
            )
            return requests, 0

        return await _run(request, body.stream, builder, prepare)

    async def _run(request: Request, stream_response: bool, builder, prepare) -> Response:
        async def start():
            requests, num_image_tokens = await prepare()
            builder.prompt_token_ids = requests[0].prompt_token_ids
            stream = frontend.generate(requests, num_image_tokens)
            try:
                first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
            return stream, first

        try:
            stream, first = await _unless_disconnected(request, start())
            if stream_response:
                events = stream_events(builder, stream, first)
                return StreamingResponse(events, media_type="text/event-stream")
            body = await _unless_disconnected(request, collect_response(builder, stream, first))
            return JSONResponse(body)
        except _ClientGone:
            return Response(status_code=499)

    return app
