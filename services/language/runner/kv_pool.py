"""The preallocated K/V tensors of the model runner (the block allocator is the scheduler's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheConfigError(ValueError):
    """The KV cache budget cannot hold even one block."""


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the K/V pool for one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def num_blocks_for(self, memory_bytes: int) -> int:
        """Blocks that fit in ``memory_bytes``; raises when not even one does."""
        num_blocks = int(memory_bytes) // self.bytes_per_block
        if num_blocks < 1:
            raise KVCacheConfigError(
                f"KV cache budget of {int(memory_bytes)} bytes holds no block of "
                f"{self.bytes_per_block} bytes; raise --kv-cache-memory or the GPU memory fraction"
            )
        return num_blocks


class KVCache:
    """The preallocated K/V tensors: per layer ``[num_blocks + 1, block_size, kv_heads, head_dim]``.

    The extra last block is scratch: padded slots (static CUDA-graph batches) write there, so
    padding never needs a branch and never touches a live block.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str):
        self.spec = spec
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [
            torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
