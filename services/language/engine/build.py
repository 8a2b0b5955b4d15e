"""Building the engine core from a checkpoint: the executor (one rank here, or N ranks), the
KV block manager sized like the runners' pools, the scheduler."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.language.engine.config import EngineConfig
from services.language.engine.core import EngineCore
from services.language.engine.kv_blocks import BlockManager
from services.language.engine.scheduler import Scheduler, SchedulerConfig
from services.language.engine.tokenizer import LanguageTokenizer
from services.language.runner.executor import Executor, LocalExecutor
from services.language.runner.model_runner import RunnerConfig
from services.language.runner.multiproc import MultiprocExecutor, RankSpec
from services.language.runner.setup import (
    RunnerSetup,
    build_runner,
    fit_to_pool,
    num_kv_blocks,
)
from services.language.runner.warmup import warm_up
from shared.kernels import select
from shared.model.config import ModelConfig, load_config
from shared.model.loader import load_text_model
from shared.model.qwen3_moe import Qwen3MoeForCausalLM

log = logging.getLogger(__name__)

# Loading a big checkpoint on every rank can take minutes; a rank that never joins fails then.
_RANK_TIMEOUT_S = 900.0


def decode_graphs(config: EngineConfig) -> bool:
    """Whether decode steps replay CUDA graphs: on CUDA unless --enforce-eager, and only over the
    Triton kernels. The PyTorch references read values on the host (an fp32 model's experts) or
    gather whole fixed-width block tables, so a capture over them crashes or runs out of memory."""
    if not config.cuda_graphs:
        return False
    if select.accelerated("cuda"):
        return True
    log.warning(
        "no Triton kernels on %s (triton missing or failing to load): CUDA graphs off, decode "
        "steps run eagerly on the PyTorch references",
        config.device,
    )
    return False


def runner_setup(config: EngineConfig, model_config: ModelConfig) -> RunnerSetup:
    # Without --max-model-len the model's length is only a ceiling: fit_to_pool cuts it to the
    # pool once the pool's size is known
    max_model_len = config.max_model_len or model_config.text.max_position_embeddings
    graphs = decode_graphs(config)
    runner = RunnerConfig(
        config.max_num_seqs,
        config.max_num_batched_tokens,
        max_model_len,
        config.block_size,
        pad_decodes=graphs if config.pad_decodes is None else config.pad_decodes,
        cuda_graphs=graphs,
    )
    return RunnerSetup(
        runner,
        config.kv_cache_memory,
        config.gpu_memory_fraction,
        config.max_num_seqs,
        fit_max_model_len=config.max_model_len is None,
    )


def build_executor(
    model_dir: Path, model_config: ModelConfig, config: EngineConfig, setup: RunnerSetup
) -> tuple[Executor, int]:
    """(executor, KV blocks per rank): in this process, or over tensor-parallel ranks."""
    dtype, expert_dtype = config.model_dtypes(model_config)
    quantization = config.weights_quantization(model_config)
    if quantization is not None:
        source = "the checkpoint's" if model_config.quantization else "quantized at load"
        log.info("language weights in %s (%s), computing in %s", quantization, source, dtype)
    elif expert_dtype is not None:
        log.info("computing in %s with the routed experts' weights in %s", dtype, expert_dtype)
    if config.tensor_parallel_size == 1:
        threads = config.threads_per_rank()
        if threads is not None:
            torch.set_num_threads(threads)
            log.info("intra-op threads: %d", threads)
        model = load_text_model(
            model_dir, dtype, config.device, expert_dtype, config.quantization
        ).eval()
        num_blocks = num_kv_blocks(model, model_config, setup)
        return LocalExecutor(build_runner(model, model_config, setup, num_blocks)), num_blocks
    specs = [
        RankSpec(
            rank,
            config.tensor_parallel_size,
            config.expert_parallel,
            str(model_dir),
            dtype,
            expert_dtype,
            device,
            setup,
            config.quantization,
            "127.0.0.1",
            0,
            config.threads_per_rank(),
            _RANK_TIMEOUT_S,
        )
        for rank, device in enumerate(config.rank_devices())
    ]
    executor = MultiprocExecutor.start(specs)
    return executor, executor.num_blocks


def build_engine_core(model_dir: str | Path, config: EngineConfig) -> EngineCore:
    """Load the checkpoint's text weights and tokenizer and wire a ready engine core."""
    model_dir = Path(model_dir)
    model_config = load_config(model_dir)
    tokenizer = LanguageTokenizer.from_model_dir(model_dir)
    setup = runner_setup(config, model_config)
    executor, num_blocks = build_executor(model_dir, model_config, config, setup)
    # It pays where the C++ CPU kernels run (oneDNN's per-shape code, the heap's growth); under
    # Triton's interpreter (SPLITVL_KERNELS=gpu on a CPU) a 2048-token step takes minutes.
    if (
        config.warm_up
        and torch.device(config.device).type == "cpu"
        and select.backend("cpu") == "cpu"
    ):
        warm_up(executor, fit_to_pool(setup, num_blocks).runner, num_blocks)
    dtype = config.resolve_dtype(model_config)
    return _core(executor, num_blocks, model_config, tokenizer, config, setup, dtype)


def core_for_model(
    model: Qwen3MoeForCausalLM,
    model_config: ModelConfig,
    tokenizer: LanguageTokenizer,
    config: EngineConfig,
) -> EngineCore:
    """An engine core over a model already in memory (benchmarks build random ones)."""
    setup = runner_setup(config, model_config)
    num_blocks = num_kv_blocks(model, model_config, setup)
    runner = build_runner(model, model_config, setup, num_blocks)
    dtype = next(model.parameters()).dtype
    return _core(LocalExecutor(runner), num_blocks, model_config, tokenizer, config, setup, dtype)


def _core(executor, num_blocks, model_config, tokenizer, config, setup, dtype) -> EngineCore:
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.min_lone_piece),
        block_manager,
    )
    max_model_len = fit_to_pool(setup, num_blocks).runner.max_model_len
    return EngineCore(executor, scheduler, model_config, tokenizer, max_model_len, dtype)
