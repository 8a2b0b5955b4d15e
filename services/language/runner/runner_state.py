"""The model runner's own per-request state, kept up to date from step plans.

A request's prompt, images and M-RoPE positions arrive once (`NewRequest`); after that only the
sampled tokens, the new blocks and the computed length (`RequestDiff`). Image embeddings are
moved to the runner's device here, once per request: the one host-to-device copy of the path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from services.language.runner.step_plan import NewRequest, RequestDiff, StepPlan
from shared.model.processing import pad_positions
from shared.wire.images import EncodedImage, PendingImage


class RunnerStateError(RuntimeError):
    """A plan refers to a request the runner does not hold, or contradicts its state."""


@dataclass
class RunnerRequest:
    """What the runner knows of one running request."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    mrope: np.ndarray | None  # [3, num_prompt_tokens] int64; None: text, (p, p, p)
    rope_delta: int
    image_positions: list[int]  # prompt indices of image pads, ascending
    # packed, on the runner's device; None for an image still being encoded
    images: list[torch.Tensor | None] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # first image row of each image
    image_sizes: list[int] = field(default_factory=list)  # rows of each image
    _blocks: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Range of image rows whose pads fall in token indices [start, end)."""
        return bisect_left(self.image_positions, start), bisect_left(self.image_positions, end)

    def block_array(self) -> np.ndarray:
        """`block_ids` as an array, rebuilt only when blocks were added (they only grow)."""
        if len(self._blocks) != len(self.block_ids):
            self._blocks = np.asarray(self.block_ids, dtype=np.int64)
        return self._blocks


class RunnerState:
    """request id -> RunnerRequest, updated in plan order: forget, add, apply diffs."""

    def __init__(self, device: torch.device, dtype: torch.dtype, pad_ids: Collection[int] = ()):
        self.device = device
        self.dtype = dtype
        self.pad_ids = pad_ids  # image and video pads
        self.requests: dict[str, RunnerRequest] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def update(self, plan: StepPlan) -> None:
        for request_id in plan.forgotten_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = self._make(new)
        for diff in plan.diffs:
            self._apply(diff)

    def __getitem__(self, request_id: str) -> RunnerRequest:
        try:
            return self.requests[request_id]
        except KeyError:
            raise RunnerStateError(f"the plan schedules unknown request {request_id!r}") from None

    def _make(self, new: NewRequest) -> RunnerRequest:
        image_positions: list[int] = []
        if new.images:
            prompt = new.token_ids[: new.num_prompt_tokens]
            image_positions = pad_positions(prompt, self.pad_ids)
        images, starts, row = [], [], 0
        for image in new.images:
            images.append(None if isinstance(image, PendingImage) else self._upload(image))
            starts.append(row)
            row += image.num_tokens
        return RunnerRequest(
            token_ids=list(new.token_ids),
            num_prompt_tokens=new.num_prompt_tokens,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            mrope=new.mrope_positions,
            rope_delta=new.rope_delta,
            image_positions=image_positions,
            images=images,
            image_starts=starts,
            image_sizes=[image.num_tokens for image in new.images],
        )

    def _upload(self, image: EncodedImage) -> torch.Tensor:
        # Non-blocking from pinned host memory on CUDA; a no-op for a tensor that arrived on
        # this device (link transport).
        return image.packed.to(self.device, self.dtype, non_blocking=True)

    def _apply(self, diff: RequestDiff) -> None:
        req = self[diff.request_id]
        for index, image in diff.new_images:
            req.images[index] = self._upload(image)
        req.token_ids.extend(diff.new_token_ids)
        req.block_ids.extend(diff.new_block_ids)
        req.num_computed_tokens = diff.num_computed_tokens
