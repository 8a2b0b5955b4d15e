"""Request types shared by the engine and the servers, and the scheduler's per-request state."""

from __future__ import annotations

import enum
import math
from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shared.model.processing import pad_positions
from shared.wire.images import EncodedImage, PendingImage


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; the message says which field to change."""


class EngineDeadError(RuntimeError):
    """The engine can no longer run steps (a tensor-parallel worker died): 503, retry elsewhere."""


class QueueFullError(RuntimeError):
    """The engine's bounded waiting queue is full; the client should retry later (HTTP 503/429)."""


# Seeds span what torch.Generator.manual_seed takes: int64 and uint64 alike (a negative seed is
# its value modulo 2**64). Counts and token ids fit int32.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
INT32_MAX = 2**31 - 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed` (seed, seed+1, ... modulo
    2**64, so every choice's seed is one manual_seed takes and choice 0 keeps `seed`)."""
    return seed if index == 0 else (seed + index) % 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    # (token id, bias) pairs added to the logits before sampling, OpenAI's `logit_bias`
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        _check(
            _finite(self.temperature) and self.temperature >= 0.0,
            f"temperature must be a finite number >= 0, got {self.temperature}",
        )
        _check(
            _finite(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p}",
        )
        _check(
            isinstance(self.top_k, int) and 0 <= self.top_k <= INT32_MAX,
            f"top_k must be an integer in [0, {INT32_MAX}] (0 disables it), got {self.top_k}",
        )
        _check(
            _finite(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _finite(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}"
            )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        _check(
            isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= INT32_MAX,
            f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens}",
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX),
            f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}",
        )
        _check(
            isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a tuple of non-empty strings, got {self.stop!r}",
        )
        _check(
            isinstance(self.stop_token_ids, tuple)
            and all(isinstance(t, int) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
            f"stop_token_ids must be token ids in [0, {INT32_MAX}], got {self.stop_token_ids!r}",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}",
        )
        _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)


def _check_logit_bias(pairs: tuple[tuple[int, float], ...]) -> None:
    _check(isinstance(pairs, tuple), f"logit_bias must be a tuple of pairs, got {pairs!r}")
    for pair in pairs:
        _check(
            isinstance(pair, tuple) and len(pair) == 2,
            f"logit_bias entry {pair!r} is not a (token id, bias) pair",
        )
        token_id, bias = pair
        _check(
            isinstance(token_id, int) and 0 <= token_id <= INT32_MAX,
            f"logit_bias keys must be token ids in [0, {INT32_MAX}], got {token_id!r}",
        )
        _check(
            _finite(bias) and -100.0 <= bias <= 100.0,
            f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}",
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt whose image pads are already expanded, one run of pads per image."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    # packed [n, (1+k)*H] each, in prompt order; a PendingImage stands for one still being
    # encoded (`AsyncEngine.provide_images` hands it over later)
    images: tuple[EncodedImage | PendingImage, ...]
    sampling: SamplingParams
    arrival_time: float
    # A compiled grammar (structured_output.CompiledGrammar) the output must follow; shared by
    # the choices of one API request, each of which gets its own matcher in the engine
    grammar: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a generated token and of the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RequestOutput:
    """One streamed delta of a request: the tokens and text produced since the last output."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    """The scheduler's mutable state of one request (owned by the engine thread only).

    ``token_ids`` holds the prompt followed by the generated tokens; ``num_computed_tokens`` of
    them have their K/V in the blocks listed in ``block_ids``. The model runner keeps its own
    copy of what it needs, fed by step plans; ``num_sent_*`` record how much of it was sent.
    """

    request: GenerationRequest
    token_ids: list[int]
    image_positions: list[int]  # prompt indices of image pads, ascending (for block hashes)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    arrival_index: int = 0  # admission order; lower is served first and preempted last
    num_sent_tokens: int = 0  # 0: the runner does not know this request (new or preempted)
    num_sent_blocks: int = 0
    mrope_positions: np.ndarray | None = None  # [3, num_prompt_tokens] int64 with images
    rope_delta: int = 0
    # xgrammar GrammarMatcher of a structured request, advanced by every sampled token
    grammar: Any = None
    # The request's images as they arrive: a PendingImage is replaced by its EncodedImage
    images: list[EncodedImage | PendingImage] = field(default_factory=list)
    unsent_images: list[int] = field(default_factory=list)  # arrived since the runner's copy
    image_starts: list[int] = field(default_factory=list)  # first image row of each image

    @classmethod
    def of(cls, request: GenerationRequest, pad_ids: int | Collection[int] = ()) -> RequestState:
        """A fresh state; image pad positions found by ``pad_ids`` (image and video pads)."""
        positions, starts, row = [], [], 0
        if request.images:
            positions = pad_positions(request.prompt_token_ids, pad_ids)
        for image in request.images:
            starts.append(row)
            row += image.num_tokens
        return cls(
            request=request,
            token_ids=list(request.prompt_token_ids),
            image_positions=positions,
            images=list(request.images),
            image_starts=starts,
        )

    @property
    def num_pending_images(self) -> int:
        return sum(isinstance(image, PendingImage) for image in self.images)

    def computable_end(self, computed: int | None = None) -> int:
        """How far the K/V can be computed now (from `computed` tokens, by default the ones
        computed): to the end, or to the first pad of the first image still pending that is
        not already computed (from the prefix cache)."""
        computed = self.num_computed_tokens if computed is None else computed
        for index, image in enumerate(self.images):
            if isinstance(image, PendingImage):
                first = self.image_positions[self.image_starts[index]]
                if first + image.num_tokens > computed:
                    return max(first, computed)
        return self.num_tokens

    def provide(self, index: int, image: EncodedImage) -> None:
        """Image `index` arrived (the caller checked it against its placeholder)."""
        self.images[index] = image
        self.unsent_images.append(index)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def has_images(self) -> bool:
        return bool(self.request.images)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Range of image rows whose pad positions fall in prompt indices [start, end)."""
        # Image rows are assigned to pads in order, so the rows of any span are contiguous.
        return bisect_left(self.image_positions, start), bisect_left(self.image_positions, end)
