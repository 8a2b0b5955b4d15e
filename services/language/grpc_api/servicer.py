"""gRPC LanguageService (splitvl.language.v1) for internal callers; the only module importing its
`*_pb2`. It shares the HTTP API's front end, so a request gets the same tokens either way.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from proto.splitvl.language.v1 import language_pb2 as pb
from proto.splitvl.language.v1 import language_pb2_grpc as pb_grpc
from services.common.auth import bearer_matches
from services.common.grpc_handlers import unary_stream
from services.language.engine.request import InvalidRequestError, RequestOutput, SamplingParams
from services.language.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from services.language.frontend.pipeline import ChatInput, LanguageFrontend
from services.language.frontend.prompt import ChatMessage, ImagePart, TextPart, VideoPart

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageService"].full_name
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Most specific first: the status code of each error class.
_STATUS: tuple[tuple[type[APIError], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServiceUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: APIError) -> grpc.StatusCode:
    """The gRPC status of a front-end error (INTERNAL for anything unexpected)."""
    return next(
        (code for kind, code in _STATUS if isinstance(error, kind)), grpc.StatusCode.INTERNAL
    )


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)


def messages_from_proto(messages) -> list[ChatMessage]:
    """Typed messages -> the front end's ChatMessages."""
    if not messages:
        raise BadRequestError("messages must hold at least one message", param="messages")
    out = []
    for index, message in enumerate(messages):
        if message.role not in _ROLES:
            raise BadRequestError(
                f"messages[{index}].role {message.role!r} is not one of {sorted(_ROLES)}",
                param=f"messages[{index}].role",
            )
        parts = []
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(TextPart(part.text))
            elif kind == "image":
                parts.append(ImagePart(data=part.image))
            elif kind == "image_url":
                parts.append(ImagePart(url=part.image_url))
            elif kind == "video":
                parts.append(_video_part(index, part.video))
            else:
                raise BadRequestError(f"messages[{index}] has an empty content part")
        out.append(ChatMessage(message.role, tuple(parts)))
    return out


def _video_part(index: int, video: pb.Video) -> VideoPart:
    source = video.WhichOneof("source")
    try:
        if source == "data":
            return VideoPart(data=video.data)
        if source == "url":
            return VideoPart(url=video.url)
        if source == "frames":
            return VideoPart(frames=tuple(video.frames.images), frames_fps=video.frames.fps)
    except ValueError as exc:
        raise BadRequestError(f"messages[{index}]: {exc}") from exc
    raise BadRequestError(f"messages[{index}] has a video part with no data, url or frames")


def video_options_from_proto(options: pb.VideoOptions) -> dict:
    """The VideoOptions fields that are set, as mm_processor_kwargs' videos_kwargs."""
    names = ("fps", "num_frames", "cap_pixels_per_frame", "min_pixels", "max_pixels")
    return {name: getattr(options, name) for name in names if options.HasField(name)}


def sampling_from_proto(sampling: pb.SamplingParams) -> tuple[SamplingParams, int | None]:
    """(SamplingParams with a placeholder max_tokens, the requested max_tokens or None)."""
    values = {name: getattr(sampling, name) for name in _SAMPLING_FIELDS if sampling.HasField(name)}
    requested = sampling.max_tokens if sampling.HasField("max_tokens") else None
    try:
        params = SamplingParams(
            **values,
            max_tokens=requested if requested is not None else 1,
            stop=tuple(sampling.stop),
            stop_token_ids=tuple(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        )
    except InvalidRequestError as exc:
        raise BadRequestError(str(exc)) from exc
    return params, requested


def response_from_output(output: RequestOutput) -> pb.GenerateResponse:
    """One engine output -> one streamed response."""
    response = pb.GenerateResponse(
        request_id=output.request_id,
        token_ids=list(output.new_token_ids),
        text=output.new_text,
        finished=output.finished,
        finish_reason=output.finish_reason or "",
    )
    for entry in output.logprobs or ():
        item = response.logprobs.add(token_id=entry.token_id, logprob=entry.logprob)
        for token_id, logprob in entry.top:
            item.top.add(token_id=token_id, logprob=logprob)
    if output.finished:
        response.usage.prompt_tokens = output.num_prompt_tokens
        response.usage.completion_tokens = output.num_output_tokens
        response.usage.cached_tokens = output.num_cached_tokens
    return response


class LanguageServicer(pb_grpc.LanguageServiceServicer):
    """Generate over the shared front end."""

    def __init__(
        self, frontend: LanguageFrontend, model_name: str | None, api_key: str | None
    ) -> None:
        self.frontend = frontend
        self.model_name = model_name
        self.api_key = api_key

    async def Generate(self, request: pb.GenerateRequest, context):  # noqa: N802 - gRPC's name
        slot = None
        try:
            self._check_key(context)
            slot = self.frontend.open_request()  # 503 while draining, 429 past the queue bound
            async for response in self._generate(request, context, slot):
                yield response
        except APIError as exc:
            await context.abort(status_for(exc), exc.message)
        except Exception:
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            if slot is not None:
                slot.close()

    async def _generate(self, request: pb.GenerateRequest, context, slot):
        arrival = time.monotonic()
        if request.model and self.model_name and request.model != self.model_name:
            raise NotFoundError(
                f"the model {request.model!r} does not exist; this server serves "
                f"{self.model_name!r}"
            )
        sampling, requested = sampling_from_proto(request.sampling)
        messages = messages_from_proto(request.messages)
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        videos = video_options_from_proto(request.video_options)
        video = self.frontend.options.videos.options({"videos_kwargs": videos})
        prompt = await self.frontend.prepare_chat(messages, request_id, ChatInput(video=video))
        requests = self.frontend.make_requests(request_id, prompt, sampling, requested, 1, arrival)
        # Leaving this generator (the client cancelled) closes the stream: the request aborts
        stream = self.frontend.generate(requests, prompt.num_image_tokens, slot, prompt.media)
        try:
            async for _, output in stream:
                if output.finished and output.finish_reason == "abort":
                    raise ServiceUnavailableError("the request was aborted by the server")
                yield response_from_output(output)
        finally:
            await stream.aclose()

    def _check_key(self, context) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_matches(str(metadata.get("authorization", "")), self.api_key):
            raise AuthenticationError("invalid or missing API key in 'authorization' metadata")


async def start_grpc_server(
    frontend: LanguageFrontend,
    host: str,
    port: int,
    model_name: str | None = None,
    api_key: str | None = None,
    max_message_bytes: int = 64 * 2**20,
) -> tuple[grpc.aio.Server, int]:
    """Start LanguageService + health + reflection; returns (server, bound port)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    servicer = LanguageServicer(frontend, model_name, api_key)
    # By hand rather than add_LanguageServiceServicer_to_server: bytes that do not parse as a
    # GenerateRequest get INVALID_ARGUMENT, not the generated deserializer's UNKNOWN.
    handlers = {"Generate": unary_stream(servicer.Generate, pb.GenerateRequest)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, _HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving() -> None:
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # Load balancers stop sending the moment the drain starts; in-flight calls go on
    frontend.serving.on_drain(not_serving)
    return server, bound
