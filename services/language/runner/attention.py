"""Attention over the paged KV cache, as the model's pluggable ``AttentionBackend``.

Kernel choice: plain ``torch.nn.functional.scaled_dot_product_attention`` on gathered blocks,
on CPU and CUDA alike. Single-token queries (decodes) are batched into one SDPA call over a
``[batch, max_blocks * block_size]`` gather with a length mask: every shape depends only on the
batch size and the padded block-table width, nothing reads a tensor value on the host, so the
decode step is capturable by CUDA graphs with static input buffers and needs no compile step
(FlexAttention's paged block mask would avoid the gather but costs a torch.compile per shape,
about as long as this whole path takes to run a benchmark). Multi-token chunks (prefills) attend
one sequence at a time: there are few per step and each is large enough to keep SDPA busy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.language.runner.kv_pool import KVCache


@dataclass(frozen=True)
class PrefillSpan:
    """One multi-token chunk: flattened rows ``[token_start, token_start + num_tokens)``."""

    token_start: int
    num_tokens: int
    context_start: int  # tokens of this sequence already in the cache before the chunk
    table_row: int  # its row of the prefill block tables
    num_blocks: int  # blocks covering context_start + num_tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each attends to.

    The first ``num_decode_tokens`` flattened rows are single-token queries, one per sequence.
    """

    slot_mapping: torch.Tensor  # [T] long, flat cache slot of every new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, width] long, padded with scratch
    decode_context_lens: torch.Tensor  # [num_decodes] long, including the new token
    prefill_block_tables: torch.Tensor  # [max_num_seqs, max_blocks] long
    prefills: tuple[PrefillSpan, ...]


class PagedAttention:
    """Writes each layer's new K/V into the cache, then attends over every sequence's context.

    One object for the runner's lifetime; ``bind`` gives it each step's metadata (views of the
    runner's persistent buffers, so a captured graph keeps reading the right addresses).
    """

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.metadata: AttentionMetadata | None = None
        self._decode_mask: torch.Tensor | None = None

    def bind(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata
        width = metadata.decode_block_tables.shape[1] * self.kv_cache.spec.block_size
        positions = torch.arange(width, device=metadata.decode_context_lens.device)
        # [num_decodes, 1, 1, width]: shared by every layer of the step.
        self._decode_mask = (positions < metadata.decode_context_lens[:, None])[:, None, None, :]

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        meta = self.metadata
        self.kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            num = meta.num_decode_tokens
            out[:num] = self._decode(layer_idx, q[:num], scale)
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            out[rows] = self._prefill(layer_idx, span, q[rows], k[rows], v[rows], scale)
        return out

    def _decode(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, Hq, D] -> [B, Hq, D] over each row's cached context."""
        cache = self.kv_cache
        tables = self.metadata.decode_block_tables
        batch, num_heads, dim = q.shape
        num_kv = cache.spec.num_kv_heads
        keys = cache.k[layer_idx][tables].view(batch, -1, num_kv, dim).transpose(1, 2)
        values = cache.v[layer_idx][tables].view(batch, -1, num_kv, dim).transpose(1, 2)
        # GQA without copying K/V: the q heads sharing a kv head become that head's queries.
        grouped = q.view(batch, num_kv, num_heads // num_kv, dim)
        out = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=self._decode_mask, scale=scale
        )
        return out.reshape(batch, num_heads, dim)

    def _prefill(
        self,
        layer_idx: int,
        span: PrefillSpan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [n, Hq, D] of one chunk -> [n, Hq, D], causal over cache + chunk."""
        num_context = span.context_start + span.num_tokens
        if span.context_start == 0:
            keys, values, mask = k, v, None  # nothing cached before: the chunk is the context
        else:
            cache = self.kv_cache
            num_kv, dim = cache.spec.num_kv_heads, cache.spec.head_dim
            table = self.metadata.prefill_block_tables[span.table_row, :span.num_blocks]
            keys = cache.k[layer_idx][table].view(-1, num_kv, dim)[:num_context]
            values = cache.v[layer_idx][table].view(-1, num_kv, dim)[:num_context]
            query_pos = torch.arange(span.num_tokens, device=q.device) + span.context_start
            mask = torch.arange(num_context, device=q.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys.transpose(0, 1).to(q.dtype),
            values.transpose(0, 1).to(q.dtype),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1)
