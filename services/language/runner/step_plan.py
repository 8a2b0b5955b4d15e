"""The plain-data plan of one engine step, from the scheduler to every model runner.

Like vLLM v1's scheduler output: a request's data travels once, when it is first scheduled (or
scheduled again after a preemption); after that each step carries only what changed (tokens
sampled since, blocks allocated since, how far the K/V is computed). The runner keeps its own
per-request state from these and never sees the scheduler's objects, so the same plan can drive
a runner in another process (tensor-parallel ranks) or fill persistent device buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.wire.images import EncodedImage, PendingImage


@dataclass(frozen=True)
class NewRequest:
    """Everything the runner keeps about a request, sent when it (re)joins the running set."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt, then any tokens generated before a preemption
    num_prompt_tokens: int
    # packed embeddings of the prompt's images, in order; a PendingImage for one still coming
    images: tuple[EncodedImage | PendingImage, ...]
    block_ids: tuple[int, ...]
    num_computed_tokens: int  # prefix-cache hits count as computed
    mrope_positions: np.ndarray | None = None  # [3, num_prompt_tokens] int64 when images
    rope_delta: int = 0  # decode position = token index + rope_delta on every axis


@dataclass(frozen=True)
class RequestDiff:
    """What changed for a request the runner already knows."""

    request_id: str
    new_token_ids: tuple[int, ...]  # tokens appended since the last plan that sent it
    new_block_ids: tuple[int, ...]
    num_computed_tokens: int
    new_images: tuple[tuple[int, EncodedImage], ...] = ()  # (index, image) arrived since


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` tokens of a request computed this step, from its ``num_computed_tokens``."""

    request_id: str
    num_tokens: int
    samples: bool  # the chunk reaches the request's last token: its logits row is returned


@dataclass(frozen=True)
class StepPlan:
    """One step: state updates first (forget, new, diffs), then the chunks to compute, in order.

    Chunks of one token (decodes) come first; logits rows follow the order of sampling chunks.
    """

    forgotten_ids: tuple[str, ...]  # finished, aborted or preempted since the last plan
    new_requests: tuple[NewRequest, ...]
    diffs: tuple[RequestDiff, ...]
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def sampling_ids(self) -> tuple[str, ...]:
        """Request ids of the logits rows, in row order."""
        return tuple(c.request_id for c in self.chunks if c.samples)

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.forgotten_ids)
