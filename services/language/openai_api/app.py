"""The OpenAI-compatible HTTP app (FastAPI) over the language front end."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.language.engine.request import GenerationRequest
from services.language.engine.structured_output import Constraint
from services.language.errors import BadRequestError, NotFoundError
from services.language.frontend.loads import LoadReporter
from services.language.frontend.metrics import CONTENT_TYPE
from services.language.frontend.pipeline import ChatInput, LanguageFrontend
from services.language.frontend.prompt import PreparedPrompt
from services.language.frontend.serving import RequestSlot
from services.language.openai_api.gate import RequestGate
from services.language.openai_api.http_errors import install_error_handlers
from services.language.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from services.language.openai_api.responses import ResponseBuilder, collect_response, stream_events
from services.language.openai_api.tokenize import add_tokenize_routes
from services.language.parsers.tool_calls import plan_tools

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class APIConfig:
    """HTTP-level settings: the served model name, the API key, request limits."""

    model_name: str
    api_key: str | None = None
    model_root: str | None = None  # the checkpoint path, reported as /v1/models "root"
    # How the language weights are held ("fp8"), reported as /v1/models "quantization"
    quantization: str | None = None
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


def warn_unknown(names: list[str]) -> None:
    """One log line naming the request fields this server ignored (vLLM does the same)."""
    if names:
        logger.warning("ignoring request fields this server does not know: %s", ", ".join(names))


def _chat_input(body: ChatCompletionRequest, frontend: LanguageFrontend):
    """(ChatInput, ToolPlan) of a chat request: template inputs, image limits, constraint."""
    render = body.render_options()
    parallel = body.parallel_tool_calls is not False
    plan = plan_tools(body.tools, body.tool_choice, parallel, frontend.options.tools)
    constraint = body.constraint()
    if plan.forced_format is not None:
        if constraint is not None:
            raise BadRequestError(
                f"tool_choice {body.tool_choice!r} forces a tool call; it cannot be combined "
                f"with {constraint.param}",
                param="tool_choice",
            )
        constraint = Constraint(plan.forced_format, "tools")
    pixels = frontend.options.images.pixel_limits(body.mm_processor_kwargs)
    video = frontend.options.videos.options(body.mm_processor_kwargs)
    return ChatInput(render, pixels, constraint, video), plan


def create_app(frontend: LanguageFrontend, config: APIConfig, lifespan=None) -> FastAPI:
    """The OpenAI-compatible HTTP app around a frontend."""
    app = FastAPI(
        title="splitvl language service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # The schema of the routes and bodies, for clients and for the API's fuzz tests
        openapi_url="/openapi.json",
    )
    app.state.frontend = frontend
    install_error_handlers(app, lambda error: frontend.metrics.rejected(error.status_code))
    app.add_middleware(
        RequestGate,
        api_key=config.api_key,
        max_request_bytes=config.max_request_bytes,
        draining=lambda: frontend.draining,
    )
    created = int(time.time())

    def model_card() -> dict:
        return {
            "id": config.model_name,
            "object": "model",
            "created": created,
            "owned_by": "splitvl",
            "root": config.model_root or config.model_name,
            "parent": None,
            "max_model_len": frontend.window.max_model_len,
            "quantization": config.quantization,
        }

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
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
        """Liveness: 200 while the process and its engine thread live (draining included)."""
        serving, reason = frontend.engine.health()
        if serving:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 when new requests can be served (engine running, not draining, an
        encode replica serving); 503 with the reason otherwise."""
        is_ready, reason = await frontend.readiness()
        if is_ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE)

    loads = LoadReporter(frontend.engine)

    @app.get("/v1/loads")
    async def load_report() -> dict:
        """This replica's load, in the format the SGLang gateway's load-aware policies read."""
        return loads.report()

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
        warn_unknown(body.check_fields())
        check_model(body.model)
        check_n(body.n)
        logprobs = body.logprobs_count()
        requested = body.requested_max_tokens()
        # Validate sampling before any image is fetched or encoded
        sampling = body.sampling_params(requested if requested is not None else 1, logprobs)
        messages = body.chat_messages()
        chat, plan = _chat_input(body, frontend)
        options = body.response_options(logprobs)
        builder = ResponseBuilder("chat", config.model_name, options, frontend.token_text)

        async def prepare() -> tuple[list[GenerationRequest], PreparedPrompt]:
            prompt = await frontend.prepare_chat(messages, builder.id, chat)
            builder.configure_output(frontend.output_config(plan, prompt))
            requests = frontend.make_requests(
                builder.id, prompt, sampling, requested, body.n, arrival
            )
            return requests, prompt

        return await _run(request, body.stream, builder, prepare)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        warn_unknown(body.check_fields())
        check_model(body.model)
        check_n(body.n)
        logprobs = body.logprobs_count()
        requested = body.max_tokens
        sampling = body.sampling_params(requested if requested is not None else 1, logprobs)
        prompt_input = body.single_prompt()
        constraint = body.constraint()
        options = body.response_options(logprobs)
        builder = ResponseBuilder("text", config.model_name, options, frontend.token_text)

        async def prepare() -> tuple[list[GenerationRequest], PreparedPrompt]:
            prompt = await asyncio.to_thread(frontend.prepare_text, prompt_input)
            grammar = await frontend.compile(constraint)
            prompt = dataclasses.replace(prompt, grammar=grammar)
            requests = frontend.make_requests(
                builder.id, prompt, sampling, requested, body.n, arrival
            )
            return requests, prompt

        return await _run(request, body.stream, builder, prepare)

    add_tokenize_routes(app, frontend, check_model, warn_unknown)

    async def _run(request: Request, stream_response: bool, builder, prepare) -> Response:
        # Admission comes before any work (images included): a refused request costs nothing
        slot: RequestSlot | None = frontend.open_request()

        async def start():
            requests, prompt = await prepare()
            builder.prompt_token_ids = requests[0].prompt_token_ids
            stream = frontend.generate(requests, prompt.num_image_tokens, slot, prompt.media)
            try:
                first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
            return stream, first

        try:
            stream, first = await _unless_disconnected(request, start())
            if stream_response:
                events = _closing(stream_events(builder, stream, first), slot)
                slot = None  # the stream closes it once its last event is sent
                return StreamingResponse(events, media_type="text/event-stream")
            body = await _unless_disconnected(request, collect_response(builder, stream, first))
            return JSONResponse(body)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if slot is not None:
                slot.close()

    return app


async def _closing(events: AsyncIterator[str], slot: RequestSlot) -> AsyncIterator[str]:
    """`events`, closing the request's slot when they end (or the client goes away)."""
    try:
        async for event in events:
            yield event
    finally:
        slot.close()
