"""Building one rank's model runner: its K/V pool sized from the memory budget, its buffers.

The same steps run in the service process (rank 0, or the only rank) and in every
tensor-parallel worker, from one picklable `RunnerSetup`, so all ranks agree on the shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from services.language.runner.kv_pool import KVCache, KVCacheSpec
from services.language.runner.model_runner import ModelRunner, RunnerConfig
from shared.kernels import select
from shared.model.config import ModelConfig
from shared.model.layers.linear import Fp8Linear
from shared.model.layers.moe import SparseMoeBlock

log = logging.getLogger(__name__)

# Without a GPU there is no free-memory probe; this caps the CPU pool when no budget is given.
CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class RunnerSetup:
    """Everything a rank needs besides the model to build its runner (picklable)."""

    runner: RunnerConfig
    kv_cache_memory: int | None  # bytes per rank; None: gpu_memory_fraction of free memory
    gpu_memory_fraction: float
    max_num_seqs: int
    # No --max-model-len given: runner.max_model_len is the model's, to be cut to what the KV
    # pool holds once its size is known (`fit_to_pool`)
    fit_max_model_len: bool = False


def fit_to_pool(setup: RunnerSetup, num_blocks: int) -> RunnerSetup:
    """The setup with its final max_model_len: without --max-model-len, the longest sequence a
    pool of `num_blocks` holds, capped at the model's (a 262,144-token default would not fit an
    80 GB GPU beside the weights, and start-up would fail unless the user guessed a length)."""
    if not setup.fit_max_model_len:
        return setup
    cfg = setup.runner
    fitted = min(cfg.max_model_len, num_blocks * cfg.block_size)
    return replace(setup, runner=replace(cfg, max_model_len=fitted), fit_max_model_len=False)


def kv_spec(model: nn.Module, config: ModelConfig, block_size: int) -> KVCacheSpec:
    """The K/V layout of this rank's model: its kv heads (a tensor-parallel rank holds fewer)."""
    text = config.text
    num_kv_heads = model.model.layers[0].self_attn.num_kv_heads
    dtype = next(model.parameters()).dtype
    return KVCacheSpec(text.num_hidden_layers, num_kv_heads, text.head_dim, block_size, dtype)


def kv_budget(setup: RunnerSetup, device: torch.device) -> int:
    if setup.kv_cache_memory is not None:
        return setup.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * setup.gpu_memory_fraction)
    return CPU_DEFAULT_KV_BYTES


def num_kv_blocks(model: nn.Module, config: ModelConfig, setup: RunnerSetup) -> int:
    """Blocks this rank's budget holds, capped where no more could ever be used."""
    device = next(model.parameters()).device
    cfg = setup.runner
    num_blocks = kv_spec(model, config, cfg.block_size).num_blocks_for(kv_budget(setup, device))
    if setup.kv_cache_memory is None:
        # No point holding more blocks than every sequence could ever fill at once.
        needed = setup.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
        num_blocks = min(num_blocks, needed)
    return num_blocks


def build_runner(
    model: nn.Module, config: ModelConfig, setup: RunnerSetup, num_blocks: int
) -> ModelRunner:
    """The runner with a K/V pool of `num_blocks` (the same on every rank), graphs captured."""
    given, setup = setup, fit_to_pool(setup, num_blocks)
    device = next(model.parameters()).device
    model.fuse_projections()
    kv_cache = KVCache(kv_spec(model, config, setup.runner.block_size), num_blocks, device)
    runner = ModelRunner(model, config, kv_cache, setup.runner)
    if compiles_triton(device):
        warm_up_kernels(model, config, runner)
    if runner.graphs is not None:
        runner.graphs.capture()
    fitted = " (the longest the pool holds)" if setup is not given else ""
    log.info(
        "runner on %s: %d KV blocks of %d tokens, max_model_len %d%s",
        device,
        num_blocks,
        setup.runner.block_size,
        setup.runner.max_model_len,
        fitted,
    )
    return runner


def compiles_triton(device: torch.device) -> bool:
    """Whether this rank's kernels are Triton's, compiled for a GPU (the interpreter that runs
    them on a CPU under SPLITVL_KERNELS=gpu compiles nothing)."""
    return device.type == "cuda" and select.accelerated("cuda")


def warm_up_kernels(model: nn.Module, config: ModelConfig, runner: ModelRunner) -> float:
    """Compile every Triton kernel variant this rank can launch (logged with the time it took),
    so no request waits for a compilation; returns the seconds."""
    from shared.kernels.gpu.warmup import WarmupShapes, warm_up

    attn = model.model.layers[0].self_attn
    moe = next(
        (layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)), None
    )
    limits = runner.buffers.limits
    shapes = WarmupShapes(
        hidden_size=config.text.hidden_size,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        rms_norm_eps=config.text.rms_norm_eps,
        top_k=moe.gate.top_k if moe is not None else 0,
        renormalize=moe.gate.norm_topk_prob if moe is not None else False,
        max_num_tokens=limits.max_num_tokens,
        max_blocks_per_seq=limits.max_blocks_per_seq,
    )
    kv = runner.kv_cache
    experts = None
    if moe is not None:
        e = moe.experts
        scales = (e.gate_up_proj_scale_inv, e.down_proj_scale_inv) if e.is_fp8 else ()
        experts = (e.gate_up_proj, e.down_proj, *scales)
    linears = {  # one of each FP8 projection shape (all layers share them)
        tuple(m.weight.shape): (m.weight, m.weight_scale_inv)
        for m in model.modules()
        if isinstance(m, Fp8Linear)
    }
    return warm_up(
        shapes,
        kv.k[0],
        kv.v[0],
        kv.scratch_block,
        experts,
        runner.dtype,
        tuple(linears.values()),
    )
