"""Turns a scheduled step into one flattened forward pass of the language model.

Per step it builds the token ids, positions (M-RoPE for Qwen3-VL, decode position = index +
rope delta on all three axes), the cache slots, the attention metadata and, for chunks that
cover image pads, the spliced image embeddings and the zero-padded deepstack rows of exactly
the image rows inside the chunk, so an image split across chunks is computed as if whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.language.attention import AttentionMetadata, PagedAttention, PrefillSpan
from services.language.kv_cache import KVCache
from services.language.request import Sequence
from services.language.scheduler import ScheduledChunk


@dataclass(frozen=True)
class ModelInputs:
    """Everything one forward pass needs, already on the model's device."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] or [3, T] long
    inputs_embeds: torch.Tensor | None  # [T, H] when the step carries image rows
    deepstack: torch.Tensor | None  # [T, k*H] when the step carries image rows and k > 0
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] long
    sampling_seqs: tuple[Sequence, ...]  # one per logits row, in row order


def _positions_1d(chunk: ScheduledChunk) -> list[int]:
    delta = chunk.seq.rope_delta
    return list(range(chunk.start + delta, chunk.end + delta))


class ModelRunner:
    """Owns the model and its KV cache; ``execute`` runs one scheduled step and returns logits."""

    def __init__(self, model: nn.Module, kv_cache: KVCache, use_mrope: bool, num_deepstack: int):
        self.model = model
        self.kv_cache = kv_cache
        self.use_mrope = use_mrope
        self.num_deepstack = num_deepstack
        self.block_size = kv_cache.spec.block_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, tuple[Sequence, ...]]:
        """Run ``chunks``; returns logits ``[num_sampling, V]`` and the sequence of each row."""
        inputs = self.prepare(chunks)
        logits = self.model(
            input_ids=None if inputs.inputs_embeds is not None else inputs.input_ids,
            positions=inputs.positions,
            inputs_embeds=inputs.inputs_embeds,
            input_deepstack_embeds=inputs.deepstack,
            attention=PagedAttention(self.kv_cache, inputs.attention),
            logits_indices=inputs.logits_indices,
        )
        return logits, inputs.sampling_seqs

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInputs:
        # Single-token chunks first: the attention backend batches them as one decode group.
        ordered = [c for c in chunks if c.num_tokens == 1] + [c for c in chunks if c.num_tokens > 1]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        for chunk in ordered:
            seq = chunk.seq
            token_ids += seq.token_ids[chunk.start:chunk.end]
            positions += _positions_1d(chunk)
            slots += self._slots(seq, chunk.start, chunk.end)
            if chunk.samples:
                logits_indices.append(len(token_ids) - 1)
                sampling_seqs.append(seq)
        device = self.device
        input_ids = torch.tensor(token_ids, dtype=torch.long).to(device)
        position_tensor = self._positions(ordered, positions)
        embeds, deepstack = self._image_inputs(ordered, input_ids)
        return ModelInputs(
            input_ids=input_ids,
            positions=position_tensor.to(device),
            inputs_embeds=embeds,
            deepstack=deepstack,
            attention=self._attention_metadata(ordered, slots),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device),
            sampling_seqs=tuple(sampling_seqs),
        )

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        # One contiguous range per block rather than a division per token: a long prefill
        # chunk touches few blocks.
        size, blocks = self.block_size, seq.block_ids
        slots: list[int] = []
        for index in range(start // size, -(-end // size)):
            lo, hi = max(start, index * size), min(end, (index + 1) * size)
            base = blocks[index] * size - index * size
            slots.extend(range(base + lo, base + hi))
        return slots

    def _positions(self, ordered: list[ScheduledChunk], flat: list[int]) -> torch.Tensor:
        base = torch.tensor(flat, dtype=torch.long)
        if not self.use_mrope:
            return base
        positions = base.expand(3, -1).clone()  # text rows: (p, p, p)
        offset = 0
        for chunk in ordered:
            seq = chunk.seq
            prompt_end = min(chunk.end, seq.num_prompt_tokens)
            if seq.mrope_positions is not None and chunk.start < prompt_end:
                count = prompt_end - chunk.start
                positions[:, offset:offset + count] = seq.mrope_positions[:, chunk.start:prompt_end]
            offset += chunk.num_tokens
        return positions

    def _image_inputs(
        self, ordered: list[ScheduledChunk], input_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        rows, embeds, deepstacks = [], [], []
        offset = 0
        for chunk in ordered:
            seq = chunk.seq
            lo, hi = seq.image_rows(chunk.start, chunk.end)
            if hi > lo:
                local = [p - chunk.start + offset for p in seq.image_positions[lo:hi]]
                rows += local
                embeds.append(seq.image_embeds[lo:hi])
                deepstacks.append(seq.image_deepstack[lo:hi])
            offset += chunk.num_tokens
        if not rows:
            return None, None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        inputs_embeds = self.model.embed_tokens(input_ids)  # [T, H]
        inputs_embeds[index] = torch.cat(embeds).to(inputs_embeds.dtype)
        deepstack = None
        if self.num_deepstack:
            width = deepstacks[0].shape[1]
            deepstack = inputs_embeds.new_zeros(input_ids.shape[0], width)  # [T, k*H]
            deepstack[index] = torch.cat(deepstacks).to(deepstack.dtype)
        return inputs_embeds, deepstack

    def _attention_metadata(
        self, ordered: list[ScheduledChunk], slots: list[int]
    ) -> AttentionMetadata:
        device = self.device
        decodes = [c for c in ordered if c.num_tokens == 1]
        scratch = self.kv_cache.scratch_block
        width = max((len(c.seq.block_ids) for c in decodes), default=1)
        tables = [c.seq.block_ids + [scratch] * (width - len(c.seq.block_ids)) for c in decodes]
        prefills = []
        offset = len(decodes)
        for chunk in ordered[len(decodes):]:
            num_blocks = -(-chunk.end // self.block_size)
            table = torch.tensor(chunk.seq.block_ids[:num_blocks], dtype=torch.long)
            prefills.append(PrefillSpan(offset, chunk.num_tokens, chunk.start, table.to(device)))
            offset += chunk.num_tokens
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(device),
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor(tables, dtype=torch.long).view(len(decodes), width)
            .to(device),
            decode_context_lens=torch.tensor([c.end for c in decodes], dtype=torch.long).to(device),
            prefills=tuple(prefills),
        )
