"""Tensor and expert parallelism for `Qwen3MoeForCausalLM`, applied around unchanged model code.

The model classes hold no parallelism (gpt-fast style): attention derives its head counts from
its projection shapes and the experts from their weight shapes, so a rank's model is the same
classes with smaller parameters, plus collectives attached as forward hooks and two small
modules swapped in for the vocabulary. Each rank reads only its slices of the checkpoint.

- Attention: q/k/v by heads (column-parallel), o_proj by its input columns (row-parallel), then
  an all-reduce. With fewer kv heads than ranks, kv heads are replicated so each rank keeps the
  kv head its q heads use.
- Experts, tensor-parallel: every rank routes the full hidden states and keeps a 1/N slice of
  every expert's intermediate dimension (gate and up halves sliced alike); the block's output is
  all-reduced. Expert-parallel (`expert_parallel`): rank r keeps whole experts
  [r E/N, (r+1) E/N); tokens routed elsewhere get weight 0 on this rank and the partial outputs
  are all-reduced. An all-to-all dispatch would instead send each token only to the ranks of its
  experts (less compute per rank, activations on the wire instead of an all-reduce of [T, H]);
  at decode batch sizes the all-reduce is the smaller message.
- Dense MLP: gate/up column-parallel, down row-parallel, all-reduce.
- Embedding and lm_head: vocabulary-parallel (rows of ceil(V / N) per rank, the last padded);
  the embedding all-reduces its masked lookups, lm_head all-gathers the logits.
- Norms and the router are replicated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.model.checkpoint import Shard
from shared.model.config import TextConfig, load_config
from shared.model.layers.mlp import DenseMLP
from shared.model.layers.moe import SparseMoeBlock
from shared.model.loader import build_text_model, finish_text_model, load_weights, text_plan_args
from shared.model.qwen3_moe import Qwen3MoeForCausalLM


class TensorParallelError(ValueError):
    """The model's shapes cannot be split across the requested number of ranks."""


@dataclass(frozen=True)
class ParallelLayout:
    """This process's place among `world_size` ranks, and how experts are split."""

    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise TensorParallelError(f"rank {self.rank} is not in [0, {self.world_size})")

    def part(self, size: int, what: str) -> tuple[int, int]:
        """This rank's equal part [start, stop) of `size`."""
        if size % self.world_size:
            raise TensorParallelError(
                f"{what} ({size}) does not split across {self.world_size} ranks"
            )
        step = size // self.world_size
        return self.rank * step, (self.rank + 1) * step

    def vocab_part(self, vocab: int) -> tuple[int, int, int]:
        """(start, stop, padded rows): ceil(V / N) rows per rank, the last one shorter."""
        rows = -(-vocab // self.world_size)
        start = min(vocab, self.rank * rows)
        return start, min(vocab, start + rows), rows


def _kv_range(config: TextConfig, layout: ParallelLayout) -> tuple[int, int]:
    kv, w, d = config.num_key_value_heads, layout.world_size, config.head_dim
    if kv % w == 0:
        a, b = layout.part(kv, "kv heads")
        return a * d, b * d
    if w % kv == 0:  # replicate: rank r's q heads all map onto kv head r * kv // w
        head = layout.rank * kv // w
        return head * d, (head + 1) * d
    raise TensorParallelError(f"{kv} kv heads do not split across {w} ranks")


def shard_specs(config: TextConfig, layout: ParallelLayout) -> dict[str, Shard]:
    """Parameter name -> this rank's slice of it (replicated parameters are absent)."""
    if layout.world_size == 1:
        return {}
    d = config.head_dim
    q = layout.part(config.num_attention_heads, "attention heads")
    q = (q[0] * d, q[1] * d)
    kv = _kv_range(config, layout)
    v0, v1, _ = layout.vocab_part(config.vocab_size)
    specs = {
        "model.embed_tokens.weight": Shard(0, ((v0, v1),)),
        "lm_head.weight": Shard(0, ((v0, v1),)),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs[p + "self_attn.q_proj.weight"] = Shard(0, (q,))
        specs[p + "self_attn.k_proj.weight"] = Shard(0, (kv,))
        specs[p + "self_attn.v_proj.weight"] = Shard(0, (kv,))
        specs[p + "self_attn.o_proj.weight"] = Shard(1, (q,))
        if config.is_moe_layer(i):
            specs.update(_expert_specs(p + "mlp.experts.", config, layout))
        else:
            a, b = layout.part(config.intermediate_size, "intermediate_size")
            specs[p + "mlp.gate_proj.weight"] = Shard(0, ((a, b),))
            specs[p + "mlp.up_proj.weight"] = Shard(0, ((a, b),))
            specs[p + "mlp.down_proj.weight"] = Shard(1, ((a, b),))
    return specs


def _expert_specs(prefix: str, config: TextConfig, layout: ParallelLayout) -> dict[str, Shard]:
    if layout.expert_parallel:
        experts = (layout.part(config.num_experts, "num_experts"),)
        return {prefix + "gate_up_proj": Shard(0, experts), prefix + "down_proj": Shard(0, experts)}
    inter = config.moe_intermediate_size
    a, b = layout.part(inter, "moe_intermediate_size")
    return {
        prefix + "gate_up_proj": Shard(2, ((a, b), (inter + a, inter + b))),
        prefix + "down_proj": Shard(1, ((a, b),)),
    }


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the embedding (padded to `weight.shape[0]`); all-reduced lookup."""

    def __init__(self, weight: torch.Tensor, start: int, stop: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.num_rows, self.group = start, stop - start, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.num_rows)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out = out.masked_fill(~mine.unsqueeze(-1), 0.0)
        dist.all_reduce(out, group=self.group)  # one non-zero term per row: exact
        return out


class ParallelLMHead(nn.Module):
    """Rows of lm_head for this rank's vocabulary part; logits all-gathered to [n, V]."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, world_size: int, group):
        super().__init__()
        self.weight = weight
        self.vocab_size, self.world_size, self.group = vocab_size, world_size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight).contiguous()  # [n, ceil(V / N)]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def _all_reduce_output(group):
    def hook(_module, _inputs, output):
        dist.all_reduce(output, group=group)
        return output

    return hook


def _local_experts(start: int, count: int):
    """Pre-hook of an expert-parallel Experts: global expert ids -> local ones; rows routed to
    other ranks' experts (or to none) get the local "no expert" id and weight 0, so they read
    no expert's weights here and add nothing."""

    def hook(_module, args):
        x, weights, ids = args
        local = ids - start
        mine = (local >= 0) & (local < count)
        return x, torch.where(mine, weights, 0), torch.where(mine, local, count)

    return hook


def _padded_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def attach_collectives(
    model: Qwen3MoeForCausalLM, config: TextConfig, layout: ParallelLayout, group
) -> None:
    """Swap in the vocabulary-parallel modules and hook the all-reduces (a loaded rank model)."""
    v0, v1, rows = layout.vocab_part(config.vocab_size)
    embed = VocabParallelEmbedding(
        _padded_rows(model.model.embed_tokens.weight, rows), v0, v1, group
    )
    model.model.embed_tokens = embed
    head_weight = (
        embed.weight
        if model.tie_word_embeddings
        else nn.Parameter(_padded_rows(model.lm_head.weight, rows), requires_grad=False)
    )
    model.lm_head = ParallelLMHead(head_weight, config.vocab_size, layout.world_size, group)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(_all_reduce_output(group))
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.register_forward_hook(_all_reduce_output(group))
            if layout.expert_parallel:
                start, _ = layout.part(config.num_experts, "num_experts")
                count = config.num_experts // layout.world_size
                layer.mlp.experts.register_forward_pre_hook(_local_experts(start, count))
        elif isinstance(layer.mlp, DenseMLP):
            layer.mlp.down_proj.register_forward_hook(_all_reduce_output(group))


def load_parallel_text_model(
    model_dir: str | Path,
    layout: ParallelLayout,
    group,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> tuple[Qwen3MoeForCausalLM, Counter[str]]:
    """This rank's model, read as slices (an FP8 checkpoint's scales sharded with their
    weights; ``quantization="fp8"`` quantizes a float checkpoint's slices after loading);
    returns it and the bytes read per tensor."""
    config = load_config(model_dir)
    model = build_text_model(config, model_dir)
    specs = shard_specs(config.text, layout)
    prefixes, skip, square_is_v5 = text_plan_args(config)
    bytes_read = load_weights(
        model,
        model_dir,
        prefixes,
        dtype,
        device,
        skip,
        square_is_v5,
        shards=specs,
        expert_dtype=expert_dtype,
    )
    model = finish_text_model(model, config, quantization)
    if layout.world_size > 1:
        attach_collectives(model, config.text, layout, group)
    return model, bytes_read
