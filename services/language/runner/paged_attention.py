"""Attention over the paged KV cache, as the model's pluggable ``AttentionBackend``.

Per layer: write the step's new K/V at their slots, then one batched paged-decode call for the
single-token rows (read through block tables inside the kernel; the PyTorch reference gathers)
and one paged-prefill call per multi-token chunk (causal over its cached context). The kernels
come from `shared.kernels.select`: C++ on CPU, Triton on CUDA, the PyTorch references
otherwise. Nothing here reads a tensor value on the host, so a decode step can be captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.language.runner.kv_pool import KVCache
from shared.kernels.select import kv_store, paged_decode, paged_prefill


@dataclass(frozen=True)
class PrefillSpan:
    """One multi-token chunk: flattened rows ``[token_start, token_start + num_tokens)``."""

    token_start: int
    num_tokens: int
    context_start: int  # tokens of this sequence already in the cache before the chunk
    table_start: int  # where its block table starts in the step's table area
    num_blocks: int  # blocks covering context_start + num_tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each attends to.

    The first ``num_decode_tokens`` flattened rows are single-token queries, one per sequence.
    """

    slot_mapping: torch.Tensor  # [T] long, flat cache slot of every new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, width] int32, padded with scratch
    decode_context_lens: torch.Tensor  # [num_decodes] long, including the new token
    prefill_block_tables: torch.Tensor  # [capacity] int32: the chunks' tables, one after another
    prefills: tuple[PrefillSpan, ...]


class PagedAttention:
    """Writes each layer's new K/V into the cache, then attends over every sequence's context.

    One object for the runner's lifetime; ``bind`` gives it each step's metadata (views of the
    runner's persistent buffers, so a captured graph keeps reading the right addresses).
    """

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.metadata: AttentionMetadata | None = None

    def bind(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        meta = self.metadata
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        num = meta.num_decode_tokens
        if not meta.prefills:  # decode-only steps: no copy of the output
            return paged_decode(
                q[:num], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
            )
        out = torch.empty_like(q)
        if num:
            out[:num] = paged_decode(
                q[:num], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
            )
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            table = meta.prefill_block_tables[span.table_start : span.table_start + span.num_blocks]
            out[rows] = paged_prefill(
                q[rows], k[rows], v[rows], k_cache, v_cache, table, span.context_start, scale
            )
        return out
