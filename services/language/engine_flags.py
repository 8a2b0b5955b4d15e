"""The language service's engine and parallelism flags, and the EngineConfig they give
(`cli` builds the whole command line from this and the front end's flags)."""

from __future__ import annotations

import argparse

from services.common.argtypes import byte_size, dtype_choice
from services.language.engine import EngineConfig
from shared.model.fp8 import QUANTIZATIONS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default="cpu")
    engine.add_argument(
        "--dtype",
        type=dtype_choice,
        default="auto",
        help="auto, float32, bfloat16 (bf16), float16",
    )
    engine.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="fp8: quantize a bf16/fp32 checkpoint's attention projections and experts to "
        "128x128-block FP8 at load (an FP8 checkpoint is served as stored without it)",
    )
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--kv-cache-memory", type=byte_size, default=None)
    engine.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-queue-len", type=int, default=1024)
    engine.add_argument(
        "--max-queue-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="admission control: refuse a request at once (429 + Retry-After) when its "
        "estimated wait for a first token exceeds this; default off",
    )
    # Test hook, hidden from --help: the executor raises on these (1-based) steps.
    engine.add_argument("--inject-step-faults", type=_steps_arg, default=(), help=argparse.SUPPRESS)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs for decode steps"
    )
    engine.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the start-up step of --max-num-batched-tokens dummy tokens (then the first "
        "long prompts pay for kernel generation and heap growth)",
    )
    parallel = p.add_argument_group("parallelism")
    parallel.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks the language model is split across (workers spawned)",
    )
    parallel.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="give each rank whole experts instead of a slice of every one",
    )
    parallel.add_argument(
        "--devices",
        default=None,
        type=_devices_arg,
        help="CUDA device indices, one per rank (e.g. 0,2); default 0..N-1",
    )
    parallel.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per rank (default: the usable cores split between the ranks)",
    )


def _devices_arg(text: str) -> tuple[str, ...]:
    try:
        return tuple(f"cuda:{int(d)}" for d in text.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--devices takes CUDA indices like 0,2; got {text!r}"
        ) from None


def _steps_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"step numbers like 3,7; got {text!r}") from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the command line."""
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_fraction=args.gpu_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queue_len=args.max_queue_len,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        expert_parallel=args.enable_expert_parallel,
        devices=args.devices,
        threads=args.threads,
        max_queue_delay_s=args.max_queue_delay,
        fault_steps=args.inject_step_faults,
        warm_up=not args.no_warm_up,
    )
