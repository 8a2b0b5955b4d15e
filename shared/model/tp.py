"""Tensor parallelism applied to a loaded `Qwen3MoeForCausalLM` after construction (as gpt-fast).

The model code has no parallelism in it: attention derives its head counts from the projection
shapes and the MoE block from its weight shapes, so sharding is slicing weights and summing partial
outputs.

- Attention: q/k/v sharded by heads (column-parallel), o_proj by its input rows (row-parallel),
  then an all-reduce. With fewer kv heads than ranks, kv heads are replicated so that each rank
  keeps the kv head its q heads use.
- MoE: every rank routes the full (replicated) hidden states and holds a 1/world slice of every
  expert's intermediate dimension (gate and up halves sliced separately); the block's output is
  all-reduced.
- Dense MLP: gate/up column-parallel, down row-parallel, all-reduce.
- Embeddings, norms, router and lm_head are replicated: the vocabulary is small next to the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from shared.model.layers.attention import Attention
from shared.model.layers.mlp import DenseMLP
from shared.model.layers.moe import SparseMoeBlock
from shared.model.qwen3_moe import Qwen3MoeForCausalLM


class TensorParallelError(ValueError):
    """The model's shapes cannot be split across the requested number of ranks."""


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None


def _slice(t: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    size = t.shape[dim] // parts
    return t.narrow(dim, rank * size, size).contiguous()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def _all_reduce_output(tp: TPGroup):
    def hook(_module, _inputs, output):
        dist.all_reduce(output, group=tp.group)
        return output

    return hook


def _shard_attention(attn: Attention, num_heads: int, num_kv_heads: int, tp: TPGroup) -> None:
    r, w = tp.rank, tp.world_size
    if num_heads % w:
        raise TensorParallelError(f"{num_heads} attention heads do not split across {w} ranks")
    d = attn.head_dim
    q = attn.q_proj.weight.view(num_heads, d, -1)
    _set(attn.q_proj, "weight", _slice(q, 0, r, w).view(-1, q.shape[-1]))
    k = attn.k_proj.weight.view(num_kv_heads, d, -1)
    v = attn.v_proj.weight.view(num_kv_heads, d, -1)
    if num_kv_heads % w == 0:
        k, v = _slice(k, 0, r, w), _slice(v, 0, r, w)
    elif w % num_kv_heads == 0:
        # Replicate: rank r's q heads all map onto kv head r * kv // w.
        idx = r * num_kv_heads // w
        k, v = k[idx : idx + 1].clone(), v[idx : idx + 1].clone()
    else:
        raise TensorParallelError(f"{num_kv_heads} kv heads do not split across {w} ranks")
    _set(attn.k_proj, "weight", k.view(-1, k.shape[-1]))
    _set(attn.v_proj, "weight", v.view(-1, v.shape[-1]))
    _set(attn.o_proj, "weight", _slice(attn.o_proj.weight, 1, r, w))
    attn.o_proj.register_forward_hook(_all_reduce_output(tp))


def _shard_moe(moe: SparseMoeBlock, tp: TPGroup) -> None:
    r, w = tp.rank, tp.world_size
    experts = moe.experts
    inter = experts.down_proj.shape[1]
    if inter % w:
        raise TensorParallelError(f"moe_intermediate_size {inter} does not split across {w} ranks")
    gate, up = experts.gate_up_proj.chunk(2, dim=-1)  # each [E, H, I]
    gate_up = torch.cat([_slice(gate, 2, r, w), _slice(up, 2, r, w)], dim=-1)
    _set(experts, "gate_up_proj", gate_up)
    _set(experts, "down_proj", _slice(experts.down_proj, 1, r, w))
    moe.register_forward_hook(_all_reduce_output(tp))


def _shard_dense(mlp: DenseMLP, tp: TPGroup) -> None:
    r, w = tp.rank, tp.world_size
    if mlp.gate_proj.weight.shape[0] % w:
        raise TensorParallelError(f"intermediate_size does not split across {w} ranks")
    _set(mlp.gate_proj, "weight", _slice(mlp.gate_proj.weight, 0, r, w))
    _set(mlp.up_proj, "weight", _slice(mlp.up_proj.weight, 0, r, w))
    _set(mlp.down_proj, "weight", _slice(mlp.down_proj.weight, 1, r, w))
    mlp.down_proj.register_forward_hook(_all_reduce_output(tp))


def apply_tensor_parallel(model: Qwen3MoeForCausalLM, tp: TPGroup) -> Qwen3MoeForCausalLM:
    """Shard `model` in place for `tp.rank` of `tp.world_size`; a no-op for one rank."""
    if tp.world_size == 1:
        return model
    cfg = model.config
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, tp)
        else:
            _shard_dense(layer.mlp, tp)
    return model
