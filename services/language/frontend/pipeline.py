"""The language service's front end, shared by the HTTP and gRPC APIs.

`LanguageFrontend` turns messages into `GenerationRequest`s (chat template, image limits and
loading, encode service, pad expansion, context-length checks, grammar compilation) and runs
them on the engine, recording metrics. Text-only requests never reach the encode service.
Grammars compile on a worker thread, so neither the event loop nor the engine thread waits on
them. It knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from services.language.engine.request import (
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    choice_seed,
)
from services.language.engine.structured_output import (
    CompiledGrammar,
    Constraint,
    GrammarCompiler,
    GrammarError,
)
from services.language.errors import BadRequestError, ServiceUnavailableError
from services.language.frontend.failures import engine_failure
from services.language.frontend.feed import MediaFeed
from services.language.frontend.image_policy import ImagePolicy, PixelLimits
from services.language.frontend.images import ImageLoader
from services.language.frontend.media import MediaInputs, MediaOptions, MediaPlan
from services.language.frontend.metrics import LanguageMetrics, RequestTimer
from services.language.frontend.pads import expand_pads, image_token_counts, media_images
from services.language.frontend.ports import EngineClient, ImageEncoder
from services.language.frontend.prompt import (
    ChatMessage,
    ContextWindow,
    PreparedPrompt,
    PromptBuilder,
    RenderOptions,
    collect_media,
)
from services.language.frontend.serving import RequestSlot, ServingState
from services.language.frontend.video_policy import VideoPolicy, VideoRequest
from services.language.parsers.chat_output import ChatOutputConfig
from services.language.parsers.reasoning import prompt_opens_reasoning, reasoning_format
from services.language.parsers.tool_calls import ToolConfig, ToolPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatInput:
    """A chat request's inputs besides the messages."""

    render: RenderOptions = field(default_factory=RenderOptions)
    pixels: PixelLimits = field(default_factory=PixelLimits)
    constraint: Constraint | None = None
    video: VideoRequest = field(default_factory=VideoRequest)

    @property
    def media(self) -> MediaOptions:
        return MediaOptions(self.pixels, self.video)


@dataclass(frozen=True)
class FrontendOptions:
    """Server-wide front-end settings from the command line."""

    reasoning_parser: str | None = None  # "qwen3"
    tools: ToolConfig = field(default_factory=ToolConfig)
    images: ImagePolicy = field(default_factory=ImagePolicy)
    videos: VideoPolicy = field(default_factory=VideoPolicy)
    # Submit a request before its images are encoded and compute its text meanwhile (False:
    # encode every image first, the reference behaviour; --no-overlap)
    overlap: bool = True


class LanguageFrontend:
    """Builds generation requests from messages and streams their outputs from the engine."""

    def __init__(
        self,
        engine: EngineClient,
        prompt_builder: PromptBuilder,
        image_loader: ImageLoader,
        encoder: ImageEncoder | None,
        window: ContextWindow,
        metrics: LanguageMetrics,
        merge_size: int = 2,
        retry_after_s: int = 1,
        options: FrontendOptions | None = None,
    ) -> None:
        self.engine = engine
        self.prompt_builder = prompt_builder
        self.image_loader = image_loader
        self.encoder = encoder
        self.window = window
        self.metrics = metrics
        self.merge_size = merge_size
        self.retry_after_s = retry_after_s
        self.options = options or FrontendOptions()
        self.grammars = GrammarCompiler(engine.tokenizer, engine.model_config.text.vocab_size)
        self.media = MediaInputs(
            image_loader, encoder, self.options.images, self.options.videos, metrics, retry_after_s
        )
        self.serving = ServingState(engine.admission, retry_after_s)

    # -- lifecycle: admission, in-flight requests, drain, readiness ---------------------------

    def open_request(self) -> RequestSlot:
        """Admit one API request before any of its work (see ServingState.open)."""
        return self.serving.open()

    @property
    def draining(self) -> bool:
        return self.serving.draining

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting, let in-flight requests finish within `timeout_s`, end the rest."""
        return await self.serving.drain(self.engine, timeout_s)

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the engine serves, not draining, and with an encode service at
        least one replica answers SERVING."""
        serving, reason = self.engine.health()
        if not serving:
            return False, reason
        if self.serving.draining:
            return False, "draining: the server is shutting down"
        if self.encoder is not None and not await self.encoder.ready():
            return False, "no encode replica is serving"
        return True, "ok"

    def token_text(self, token_id: int) -> str:
        """The text of one token, for logprobs."""
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    async def prepare_chat(
        self, messages: Sequence[ChatMessage], request_id: str, chat: ChatInput | None = None
    ) -> PreparedPrompt:
        """Render, tokenize, compile the grammar, load and encode images and videos, expand
        their pads."""
        chat = chat or ChatInput()
        media = collect_media(messages)
        self.media.check_counts(media)  # before anything is loaded
        text, token_ids = await self._render(messages, chat.render)
        # Each image adds at least one token: refuse hopeless prompts before encoding anything
        self.window.check_prompt(len(token_ids))
        opens = self.options.reasoning_parser is not None and prompt_opens_reasoning(text)
        grammar = await self.compile(chat.constraint, opens)
        if not media:
            return PreparedPrompt(tuple(token_ids), grammar=grammar, reasoning_open=opens)
        frames = any(getattr(part, "frames", ()) for part in media)  # no headers to plan from
        if self.options.overlap and self.encoder is not None and not frames:
            plan = await self.media.plan(media, chat.media)
            pending = plan.placeholders()
            expanded = await self._expand(messages, text, token_ids, plan.videos, pending)
            return PreparedPrompt(expanded, tuple(pending), grammar, opens, plan)
        encoded = await self.media.encode(media, chat.media)
        videos = [item.timestamps for item in encoded if item.is_video]
        images = media_images(encoded)
        expanded = await self._expand(messages, text, token_ids, videos, images)
        return PreparedPrompt(expanded, tuple(images), grammar, opens)

    async def _expand(self, messages, text, token_ids, videos, images) -> tuple[int, ...]:
        """Token ids with each video's placeholder replaced by its groups (with their times)
        and every pad expanded to its image's rows."""
        if videos:
            token_ids = await self._tokenize_videos(messages, text, videos)
        counts = image_token_counts(images, self.merge_size)
        return expand_pads(token_ids, self.pad_ids, counts)

    @property
    def pad_ids(self) -> tuple[int, ...]:
        builder = self.prompt_builder
        return tuple(t for t in (builder.image_token_id, builder.video_token_id) if t is not None)

    async def _tokenize_videos(
        self, messages: Sequence[ChatMessage], text: str, videos: list[tuple[float, ...]]
    ) -> list[int]:
        markers = self.prompt_builder.video_markers
        if markers is None:
            raise BadRequestError("this model takes no video input; remove the video parts")
        text = markers.render(text, videos)
        return await asyncio.to_thread(self.prompt_builder.encode, text)

    async def _render(
        self, messages: Sequence[ChatMessage], options: RenderOptions
    ) -> tuple[str, list[int]]:
        def render() -> tuple[str, list[int]]:
            text = self.prompt_builder.render(messages, options)
            return text, self.prompt_builder.tokenize_rendered(messages, text)

        # Tokenizing a long prompt takes milliseconds: keep it off the event loop
        return await asyncio.to_thread(render)

    async def compile(
        self, constraint: Constraint | None, reasoning_open: bool = False
    ) -> CompiledGrammar | None:
        """The constraint's grammar (cached), compiled on a worker thread; 400 naming the field
        when it does not compile. With a reasoning parser the model may think before it."""
        if constraint is None:
            return None
        fmt = constraint.format
        if self.options.reasoning_parser is not None:
            fmt = reasoning_format(fmt, reasoning_open)
        try:
            return await asyncio.to_thread(self.grammars.compile, fmt)
        except GrammarError as exc:
            raise BadRequestError(
                f"{constraint.param} cannot be compiled into a grammar: {exc}",
                param=constraint.param,
            ) from exc

    def output_config(self, plan: ToolPlan, prompt: PreparedPrompt) -> ChatOutputConfig:
        """The parsers a chat request's choices run."""
        return ChatOutputConfig(
            reasoning=self.options.reasoning_parser is not None,
            reasoning_open=prompt.reasoning_open,
            tool_calls=plan.parse,
            max_tool_calls=plan.max_calls,
        )

    async def count_chat(self, messages: Sequence[ChatMessage], chat: ChatInput) -> list[int]:
        """The prompt token ids a chat request would have, pads expanded to each image's and
        video's token count computed from its size (loaded and read, not encoded)."""
        media = collect_media(messages)
        self.media.check_counts(media)
        text, token_ids = await self._render(messages, chat.render)
        if not media:
            return token_ids
        plan = await self.media.plan(media, chat.media)
        expanded = await self._expand(messages, text, token_ids, plan.videos, plan.placeholders())
        return list(expanded)

    def prepare_text(self, prompt: str | Sequence[int]) -> PreparedPrompt:
        """A plain completion prompt (text, or token ids that must not contain image pads)."""
        if isinstance(prompt, str):
            token_ids = list(self.engine.tokenizer.encode(prompt))
        else:
            token_ids = list(prompt)
            vocab = self.engine.model_config.text.vocab_size
            if any(not 0 <= t < vocab for t in token_ids):
                raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if any(t in self.pad_ids for t in token_ids):
            raise BadRequestError(
                "plain completions cannot carry images or videos; use /v1/chat/completions",
                param="prompt",
            )
        self.window.check_prompt(len(token_ids))
        return PreparedPrompt(tuple(token_ids))

    def make_requests(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        requested_max_tokens: int | None,
        n: int,
        arrival_time: float,
    ) -> list[GenerationRequest]:
        """One engine request per choice; choices with a seed get seed, seed+1, ... (mod 2**64)"""
        max_tokens = self.window.max_tokens(len(prompt.token_ids), requested_max_tokens)
        requests = []
        for index in range(n):
            seed = None if sampling.seed is None else choice_seed(sampling.seed, index)
            params = dataclasses.replace(sampling, max_tokens=max_tokens, seed=seed)
            rid = request_id if n == 1 else f"{request_id}-{index}"
            requests.append(
                GenerationRequest(
                    rid, prompt.token_ids, prompt.images, params, arrival_time, prompt.grammar
                )
            )
        return requests

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        num_image_tokens: int = 0,
        slot: RequestSlot | None = None,
        media: MediaPlan | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) pairs; the first output of every choice is awaited first.

        Errors the engine raises on submission (queue full, prompt too long) therefore surface
        before a response starts. Closing the iterator early aborts every choice. `slot` (from
        `open_request`) learns of the first token, for admission control. With `media` (the
        prompt's plan) the images are encoded now and handed over as each arrives.
        """
        iterators = await self._submit(requests)
        feed = None
        if media is not None:
            feed = MediaFeed(media, self.encoder, self.engine, self.metrics, self.retry_after_s)
            feed.start([r.request_id for r in requests])
        timers = [RequestTimer(self.metrics, r.arrival_time) for r in requests]
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(index, it, queue)) for index, it in enumerate(iterators)]
        unfinished, counted = set(range(len(requests))), False
        try:
            while unfinished:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise engine_failure(item, self.retry_after_s) from item
                if not counted:  # once per API request, when the engine has accepted it
                    counted = True
                    if slot is not None:
                        slot.started()
                    self.metrics.prompt_tokens.inc(len(requests[0].prompt_token_ids))
                    self.metrics.image_tokens.inc(num_image_tokens)
                _record(timers[index], item)
                if item.finished:
                    unfinished.discard(index)
                yield index, item
        finally:
            # Cancelling a pump closes its engine stream mid-flight, which aborts the request
            for pump in pumps:
                pump.cancel()
            for _ in unfinished:
                self.metrics.requests_finished.labels(finish_reason="abort").inc()
            # Shielded: a cancelled caller (client gone) may be cancelled again at every await
            aborted = [requests[index].request_id for index in unfinished]
            await asyncio.shield(asyncio.ensure_future(self._settle(pumps, aborted, feed)))

    async def _settle(
        self, pumps: list[asyncio.Task], aborted: list[str], feed: MediaFeed | None
    ) -> None:
        if feed is not None:
            await feed.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # Covers a stream cancelled before it ever ran (its own cleanup never started)
        for request_id in aborted:
            with suppress(Exception):
                await self.engine.abort(request_id)

    async def _submit(self, requests: Sequence[GenerationRequest]) -> list:
        iterators = []
        try:
            for request in requests:
                iterators.append(self.engine.generate(request))
        except Exception as exc:
            # Choices already queued would otherwise run unobserved
            for request in requests[: len(iterators)]:
                await self.engine.abort(request.request_id)
            for iterator in iterators:
                with suppress(Exception):
                    await asyncio.wait_for(_drain(iterator), timeout=5.0)
            raise engine_failure(exc, self.retry_after_s) from exc
        return iterators


async def _drain(iterator: AsyncIterator) -> None:
    async for _ in iterator:
        pass


async def _pump(index: int, iterator: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    finished = False
    try:
        async for output in iterator:
            finished = output.finished
            queue.put_nowait((index, output))
    except Exception as exc:  # handed to the consumer, which raises it in the request's task
        queue.put_nowait((index, exc))
        return
    if not finished:
        queue.put_nowait((index, ServiceUnavailableError("the engine dropped the request")))


def _record(timer: RequestTimer, output: RequestOutput) -> None:
    now = time.monotonic()
    timer.on_tokens(now, len(output.new_token_ids))
    if output.finished:
        timer.on_finish(now, output.finish_reason, output.num_output_tokens)
