"""The synchronous engine: admit requests, run scheduled steps, turn samples into outputs.

Single-threaded by design; ``AsyncEngine`` drives it from one dedicated thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.language.engine.kv_blocks import BlockManager
from services.language.engine.request import (
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    RequestState,
    TokenLogprob,
)
from services.language.engine.sampler import Sampler, build_sampling_batch
from services.language.engine.scheduler import Scheduler
from services.language.engine.tokenizer import IncrementalDetokenizer, LanguageTokenizer
from services.language.runner.executor import Executor
from shared.model.config import ModelConfig
from shared.model.processing import mrope_positions, pad_positions
from shared.wire.images import EncodedImage, PendingImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and cache effectiveness."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_waiting_tokens: int = 0  # prompt tokens of waiting requests not computed yet
    num_generated_tokens: int = 0  # since start, for throughput
    block_size: int = 16
    max_num_seqs: int = 1


@dataclass
class _Tracked:
    seq: RequestState
    detokenizer: IncrementalDetokenizer
    pending_logprobs: list[TokenLogprob]


class EngineCore:
    """The scheduler, the executor and the sampler; ``step`` advances every running request."""

    def __init__(
        self,
        executor: Executor,
        scheduler: Scheduler,
        model_config: ModelConfig,
        tokenizer: LanguageTokenizer,
        max_model_len: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.executor = executor
        self.dtype = dtype
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self._tracked: dict[str, _Tracked] = {}
        self.num_generated_tokens = 0
        self.stalled = False  # the last step had nothing to run

    # -- admission -------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for a request this engine can never serve."""
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty: send at least one token")
        if num_prompt > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens but max_model_len is {self.max_model_len}; "
                "shorten the prompt or use fewer / smaller images"
            )
        vocab = self.model_config.text.vocab_size
        if min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        for token_id, _ in request.sampling.logit_bias:
            if token_id >= vocab:
                raise InvalidRequestError(
                    f"logit_bias names token {token_id}, but token ids are in [0, {vocab})"
                )
        total = min(num_prompt + request.sampling.max_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise InvalidRequestError(
                f"the request needs up to {total} tokens of KV cache but the whole pool holds "
                f"{capacity}; lower max_tokens or raise --kv-cache-memory"
            )
        if request.request_id in self._tracked:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        self._validate_images(request)

    def _validate_images(self, request: GenerationRequest) -> None:
        cfg = self.model_config
        if not request.images:
            return
        if not cfg.vision_pad_ids:
            raise InvalidRequestError("this model is text-only: remove the images")
        for i, image in enumerate(request.images):
            if not isinstance(image, PendingImage):
                self._check_width(i, image)
        num_pads = len(pad_positions(request.prompt_token_ids, cfg.vision_pad_ids))
        num_rows = sum(image.num_tokens for image in request.images)
        if num_pads != num_rows:
            raise InvalidRequestError(
                f"the prompt has {num_pads} image and video pad tokens but the images have "
                f"{num_rows} embedding rows; expand each pad to its image's token count"
            )

    def _check_width(self, index: int, image: EncodedImage) -> None:
        cfg = self.model_config
        width = (1 + cfg.num_deepstack) * cfg.text.hidden_size
        if image.packed.shape[1] != width:
            raise InvalidRequestError(
                f"image {index}: packed embeddings have width {image.packed.shape[1]}, this "
                f"model needs (1 + {cfg.num_deepstack}) x {cfg.text.hidden_size} = {width}; "
                "the encode service serves another model"
            )

    def provide_images(self, request_id: str, items: list[tuple[int, EncodedImage]]) -> None:
        """Images of a request that were pending; InvalidRequestError (and nothing changed)
        when one is not the image its placeholder laid the prompt out for. A request that
        ended meanwhile takes nothing."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        seq = tracked.seq
        for index, image in items:
            pending = seq.images[index] if 0 <= index < len(seq.images) else None
            if not isinstance(pending, PendingImage):
                raise InvalidRequestError(f"image {index} of {request_id} is not pending")
            if not pending.accepts(image):
                raise InvalidRequestError(
                    f"image {index}: encoded as grid {tuple(image.grid_thw)} ({image.num_tokens} "
                    f"rows), but the prompt was laid out for {tuple(pending.grid_thw)} "
                    f"({pending.num_tokens} rows): the encode service resized it differently"
                )
            self._check_width(index, image)
        for index, image in items:
            seq.provide(index, image)

    def add_request(self, request: GenerationRequest) -> None:
        """Validate ``request`` and queue it."""
        self.validate(request)
        seq = self._make_sequence(request)
        detok = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, request.sampling.stop
        )
        self._tracked[request.request_id] = _Tracked(seq, detok, [])
        self.scheduler.add(seq)

    def _make_sequence(self, request: GenerationRequest) -> RequestState:
        cfg = self.model_config
        seq = RequestState.of(request, cfg.vision_pad_ids)
        if request.sampling.seed is not None:
            device = self.executor.device
            seq.generator = torch.Generator(device=device).manual_seed(request.sampling.seed)
        if request.grammar is not None:
            seq.grammar = request.grammar.new_matcher()
        if request.images:
            try:
                positions, delta = mrope_positions(
                    list(request.prompt_token_ids),
                    [tuple(im.grid_thw) for im in request.images],
                    cfg.vision_pad_ids,
                    cfg.vision.spatial_merge_size,
                )
            except ValueError as exc:
                raise InvalidRequestError(f"image tokens do not match the images: {exc}") from exc
            seq.mrope_positions, seq.rope_delta = positions.numpy(), delta
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop ``request_id`` now and free its blocks; returns its final output if it was live."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.finish(tracked.seq, "abort")
        return self._make_output(tracked, [], finished=True)

    # -- stepping --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.scheduler.has_pending_plan()

    def live_request_ids(self) -> list[str]:
        return list(self._tracked)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample; returns one output per request that produced tokens."""
        scheduled = self.scheduler.schedule()
        self.stalled = scheduled.plan.is_empty  # everything waits (for images): nothing ran
        if self.stalled:
            return []
        logits = self.executor.execute(scheduled.plan)
        self.scheduler.complete_step(scheduled)
        seqs = [w.seq for w in scheduled.chunks if w.samples]
        if not seqs:
            return []
        batch = build_sampling_batch(list(seqs), logits.shape[1], logits.device)
        sampled = self.sampler(logits, batch)
        outputs = []
        for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            outputs.append(self._append_token(seq, token_id, logprob))
        self.num_generated_tokens += len(outputs)
        return outputs

    def _append_token(
        self, seq: RequestState, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        tracked = self._tracked[seq.request_id]
        seq.token_ids.append(token_id)
        if logprob is not None:
            tracked.pending_logprobs.append(logprob)
        reason = self._finish_reason(seq, tracked.detokenizer, token_id)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._tracked[seq.request_id]
            tracked.detokenizer.flush()
        return self._make_output(tracked, [token_id], finished=reason is not None)

    def _finish_reason(
        self, seq: RequestState, detok: IncrementalDetokenizer, token_id: int
    ) -> str | None:
        params = seq.sampling
        grammar = seq.grammar
        if grammar is not None and not grammar.accept_token(token_id):
            # The sampler masked every token the grammar refuses, so this is a bug, not input
            log.error("request %s: token %d breaks its grammar; aborting", seq.request_id, token_id)
            return "abort"
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return "stop"
        if detok.add_token(token_id):
            return "stop"
        if grammar is not None and grammar.is_terminated():
            return "stop"  # the grammar is complete and took its stop token (even with ignore_eos)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _make_output(self, tracked: _Tracked, new_ids: list[int], finished: bool) -> RequestOutput:
        seq = tracked.seq
        logprobs = None
        if seq.sampling.logprobs is not None:
            logprobs = tuple(tracked.pending_logprobs)
            tracked.pending_logprobs.clear()
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tuple(new_ids),
            new_text=tracked.detokenizer.pop_new_text(finished),
            finished=finished,
            finish_reason=(seq.finish_reason or "abort") if finished else None,
            logprobs=logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_usage=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_waiting_tokens=self.scheduler.num_waiting_tokens,
            num_generated_tokens=self.num_generated_tokens,
            block_size=bm.block_size,
            max_num_seqs=self.scheduler.config.max_num_seqs,
        )
