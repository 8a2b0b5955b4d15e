"""Runs step plans on the model: host-side preparation, then the device forward.

Per step the runner updates its own request state from the plan, fills the persistent step
buffers on the host (token ids, positions, cache slots, block tables, logits rows) and uploads
them with one copy, then runs the model on views of the device buffers. Decode-only steps may
be padded to a capture size (padding rows write to the scratch block, and a count of the real
rows on the device keeps them out of MoE routing) and, on CUDA, replay a graph captured for
that size; other steps run eagerly. An image split across prefill chunks is
computed as if whole: each chunk splices exactly the image rows it covers.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from services.language.runner.cuda_graphs import DecodeGraphs
from services.language.runner.kv_pool import KVCache
from services.language.runner.paged_attention import AttentionMetadata, PagedAttention, PrefillSpan
from services.language.runner.runner_state import RunnerRequest, RunnerState, RunnerStateError
from services.language.runner.step_buffers import BufferLimits, StepBuffers
from services.language.runner.step_plan import StepPlan
from shared.model.config import ModelConfig

log = logging.getLogger(__name__)

# Decode batch sizes a step is padded to (and, on CUDA, captured for), up to max_num_seqs.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class RunnerConfig:
    """Step limits and how decode steps run."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    # Pad decode-only steps to the next capture size: required for CUDA graphs, which replay
    # fixed shapes; optional elsewhere (the same buffers and padding, run eagerly).
    pad_decodes: bool = False
    cuda_graphs: bool = False

    @property
    def capture_sizes(self) -> tuple[int, ...]:
        sizes = [s for s in CAPTURE_SIZES if s < self.max_num_seqs]
        return (*sizes, self.max_num_seqs)

    def padded(self, num_decodes: int) -> int:
        return self.capture_sizes[bisect_left(self.capture_sizes, num_decodes)]


@dataclass(frozen=True)
class ImageSplice:
    """Image rows ``src`` (packed, a view) go to step rows ``[dest, dest + len(src))``."""

    dest: int
    src: torch.Tensor


@dataclass(frozen=True)
class StepBatch:
    """Host-side facts of one prepared step; tensors live in the step buffers."""

    num_tokens: int  # flattened rows, padding included
    num_decodes: int  # one-token rows at the front, padding included
    decode_width: int  # block-table columns the decodes read (the full width when padded)
    prefills: tuple[PrefillSpan, ...]
    num_logits: int  # rows whose logits are computed (padding included)
    num_sampled: int  # real sampling rows, the first of them
    splices: tuple[ImageSplice, ...]
    graph_size: int | None  # replay the graph of this decode size
    padded: bool  # a decode step padded to a capture size (its padding rows route nowhere)


class ModelRunner:
    """Owns the model, the K/V pool, its request state and step buffers; ``execute(plan)``."""

    def __init__(
        self, model: nn.Module, model_config: ModelConfig, kv_cache: KVCache, config: RunnerConfig
    ):
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model_config.text
        self.hidden_size = text.hidden_size
        self.num_deepstack = model_config.num_deepstack
        self.use_mrope = text.mrope_section is not None
        self.state = RunnerState(self.device, self.dtype, model_config.vision_pad_ids)
        self.block_size = config.block_size
        max_blocks = -(-config.max_model_len // config.block_size)
        limits = BufferLimits(
            max(config.max_num_batched_tokens, config.max_num_seqs),
            config.max_num_seqs,
            max_blocks,
        )
        self.buffers = StepBuffers(limits, self.device, kv_cache.scratch_block)
        self.attention = PagedAttention(kv_cache)
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(
                config.capture_sizes, self.device, self._prepare_padded, self._forward_padded
            )

    # -- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Apply the plan's state changes and run its chunks; logits ``[num_sampling, V]``."""
        self.state.update(plan)
        if not plan.chunks:
            return None
        batch = self.prepare(plan)
        logits = self.forward(batch)
        for chunk in plan.chunks:
            self.state[chunk.request_id].num_computed_tokens += chunk.num_tokens
        return logits[: batch.num_sampled]

    def prepare(self, plan: StepPlan) -> StepBatch:
        """Fill the host buffers for ``plan`` and upload them (one copy)."""
        host = self.buffers.host
        chunks = plan.chunks
        num_decodes = sum(1 for c in chunks if c.num_tokens == 1)
        decode_only = num_decodes == len(chunks) and all(c.samples for c in chunks)
        padded = decode_only and self.config.pad_decodes and num_decodes <= self.config.max_num_seqs
        num_rows = self.config.padded(num_decodes) if padded else num_decodes
        # The decode tables are as wide as the longest decode row needs: only that is uploaded.
        computed = [self.state[c.request_id].num_computed_tokens for c in chunks[:num_decodes]]
        width = self._num_blocks(max(computed, default=0) + 1)
        self.buffers.begin_step(num_rows, width)
        offset, num_logits = 0, 0
        prefills, splices = [], []
        for index, chunk in enumerate(chunks):
            req = self.state[chunk.request_id]
            start, n = req.num_computed_tokens, chunk.num_tokens
            num_blocks = self._num_blocks(start + n)
            if n == 1:
                self._fill_decode(req, index, start, num_blocks)
            else:
                self._fill_tokens(req, offset, start, n)
                table = self.buffers.add_prefill_table(req.block_array()[:num_blocks])
                prefills.append(PrefillSpan(offset, n, start, table, num_blocks))
            if start < req.num_prompt_tokens and req.images:
                splices += self._splices(req, offset, start, n)
            if chunk.samples:
                host["logits_indices"][num_logits] = offset + n - 1
                num_logits += 1
            offset += n
        num_sampled = num_logits
        if padded:
            host["num_valid_tokens"][0] = num_decodes
        if num_rows > num_decodes:
            offset, num_logits = self._fill_padding(num_decodes, num_rows), num_rows
        self.buffers.upload()
        graph = num_rows if padded and self.graphs is not None else None
        if padded:  # a graph's fixed shapes, replayed or not (so CPU runs mirror GPU steps)
            self.buffers.scatter_decode_tables(num_rows, width)
            width = self.buffers.limits.max_blocks_per_seq
        return StepBatch(
            offset,
            num_rows,
            width,
            tuple(prefills),
            num_logits,
            num_sampled,
            tuple(splices),
            graph,
            padded,
        )

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _fill_decode(self, req: RunnerRequest, row: int, start: int, num_blocks: int) -> None:
        """One token at position `start` in row `row`: scalar writes, the common case of a
        step (numpy's per-call overhead would dominate a vectorized fill of one element)."""
        host, size = self.buffers.host, self.block_size
        blocks = req.block_array()
        host["input_ids"][row] = req.token_ids[start]
        host["slot_mapping"][row] = blocks[start // size] * size + start % size
        if start >= req.num_prompt_tokens:
            host["positions"][:, row] = start + req.rope_delta
        elif req.mrope is not None:
            host["positions"][:, row] = req.mrope[:, start]
        else:
            host["positions"][:, row] = start
        self.buffers.decode_tables[row, :num_blocks] = blocks[:num_blocks]
        host["decode_context_lens"][row] = start + 1

    def _fill_tokens(self, req: RunnerRequest, offset: int, start: int, n: int) -> None:
        host = self.buffers.host
        end = start + n
        host["input_ids"][offset : offset + n] = req.token_ids[start:end]
        idx = np.arange(start, end)
        blocks = req.block_array()
        host["slot_mapping"][offset : offset + n] = (
            blocks[idx // self.block_size] * self.block_size + idx % self.block_size
        )
        positions = host["positions"][:, offset : offset + n]
        positions[:] = idx + (req.rope_delta if start >= req.num_prompt_tokens else 0)
        if req.mrope is not None and start < req.num_prompt_tokens:
            prompt_end = min(end, req.num_prompt_tokens)
            positions[:, : prompt_end - start] = req.mrope[:, start:prompt_end]
            positions[:, prompt_end - start :] = idx[prompt_end - start :] + req.rope_delta

    def _fill_padding(self, start: int, end: int) -> int:
        """Rows [start, end) of a padded decode step: token 0 at position 0, writing and reading
        only the scratch block; every row's logits are computed (fixed shapes)."""
        host = self.buffers.host
        host["input_ids"][start:end] = 0
        host["positions"][:, start:end] = 0
        host["slot_mapping"][start:end] = self.kv_cache.scratch_block * self.block_size
        host["decode_context_lens"][start:end] = 1
        host["logits_indices"][start:end] = np.arange(start, end)
        return end

    def _padded_batch(self, size: int) -> StepBatch:
        """A decode step of `size` padding rows (what a graph of that size is captured on)."""
        width = self.buffers.limits.max_blocks_per_seq
        return StepBatch(size, size, width, (), size, size, (), None, True)

    def _prepare_padded(self, size: int) -> None:
        self.buffers.begin_step(size, 1)
        self._fill_padding(0, size)
        self.buffers.host["num_valid_tokens"][0] = 0
        self.buffers.upload()
        self.buffers.scatter_decode_tables(size, 1)

    def _forward_padded(self, size: int) -> torch.Tensor:
        return self.forward(self._padded_batch(size))

    @staticmethod
    def _splices(req: RunnerRequest, offset: int, start: int, n: int) -> list[ImageSplice]:
        lo, hi = req.image_rows(start, start + n)
        splices = []
        for i, image in enumerate(req.images):
            first, last = (
                max(lo, req.image_starts[i]),
                min(hi, req.image_starts[i] + req.image_sizes[i]),
            )
            if first < last:
                if image is None:
                    raise RunnerStateError(f"image {i} is scheduled before it arrived")
                dest = req.image_positions[first] - start + offset
                splices.append(
                    ImageSplice(
                        dest, image[first - req.image_starts[i] : last - req.image_starts[i]]
                    )
                )
        return splices

    # -- the forward ---------------------------------------------------------------------------

    def metadata(self, batch: StepBatch) -> AttentionMetadata:
        """Attention metadata as views of the device buffers."""
        buffers, b = self.buffers, batch.num_decodes
        if batch.padded:  # the fixed-width table a graph reads (scattered by `prepare`)
            tables = buffers.decode_block_tables[:b]
        else:
            tables = buffers.device_decode_tables(b, batch.decode_width)
        return AttentionMetadata(
            slot_mapping=buffers.dev["slot_mapping"][: batch.num_tokens],
            num_decode_tokens=b,
            decode_block_tables=tables,
            decode_context_lens=buffers.dev["decode_context_lens"][:b],
            prefill_block_tables=buffers.dev_tables,
            prefills=batch.prefills,
        )

    def positions(self, num_tokens: int) -> torch.Tensor:
        positions = self.buffers.dev["positions"]
        return positions[:, :num_tokens] if self.use_mrope else positions[0, :num_tokens]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits ``[num_logits, V]`` of the prepared step."""
        if batch.graph_size is not None:
            return self.graphs.replay(batch.graph_size)
        dev = self.buffers.dev
        input_ids = dev["input_ids"][: batch.num_tokens]
        inputs_embeds, deepstack = self._image_inputs(batch, input_ids)
        self.attention.bind(self.metadata(batch))
        return self.model(
            input_ids=None if inputs_embeds is not None else input_ids,
            positions=self.positions(batch.num_tokens),
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=deepstack,
            attention=self.attention,
            logits_indices=dev["logits_indices"][: batch.num_logits],
            # Read on the device: a replayed graph routes each step's own padding nowhere.
            num_valid_tokens=dev["num_valid_tokens"] if batch.padded else None,
        )

    def _image_inputs(
        self, batch: StepBatch, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings with the image rows spliced in, and the zero-padded deepstack."""
        if not batch.splices:
            return None, None
        hidden = self.hidden_size
        inputs_embeds = self.model.embed_tokens(input_ids)  # [T, H]
        deepstack = None
        if self.num_deepstack:
            deepstack = inputs_embeds.new_zeros(batch.num_tokens, self.num_deepstack * hidden)
        for splice in batch.splices:
            rows = slice(splice.dest, splice.dest + splice.src.shape[0])
            # The one copy of each image row into the step: straight from the packed tensor.
            inputs_embeds[rows] = splice.src[:, :hidden]
            if deepstack is not None:
                deepstack[rows] = splice.src[:, hidden:]
        return inputs_embeds, deepstack
