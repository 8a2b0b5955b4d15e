"""Engine settings, fixed at start-up (built from the command line by the service)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shared.model.config import DTYPES, ModelConfig
from shared.model.fp8 import QUANTIZATIONS
from shared.wire.units import compute_dtype, resolve_dtype


class EngineConfigError(ValueError):
    """An engine setting is out of range; the message names the flag to change."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, fixed at start-up."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: gpu_memory_fraction of free GPU memory
    gpu_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Prompt pieces before a still-encoding image shorter than this wait for a step with other
    # work instead of a step of their own (see engine.scheduler); 0: never wait
    min_lone_piece: int = 32
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_queue_len: int = 1024
    dtype: str = "auto"  # "auto": the checkpoint's (float32 on a CPU without native bf16)
    # "fp8": quantize a float checkpoint's projections and experts at load; None: as stored
    quantization: str | None = None
    device: str = "cpu"
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # Pad decode-only steps to capture sizes; None: only where graphs replay them (CUDA).
    pad_decodes: bool | None = None
    tensor_parallel_size: int = 1
    expert_parallel: bool = False  # whole experts per rank instead of slices of every expert
    devices: tuple[str, ...] | None = None  # one per rank; None: derived from `device`
    threads: int | None = None  # intra-op threads per rank; None: the cores split between ranks
    # Admission control: refuse a request at arrival when its estimated wait for a first token
    # (the requests ahead of it over the recent first-token rate) exceeds this; None: off.
    max_queue_delay_s: float | None = None
    # On a CPU with the C++ kernels, run one step of max_num_batched_tokens dummy tokens before
    # serving (runner.warmup)
    warm_up: bool = True
    # Test hook, off by default: the executor raises on these step numbers (1-based), so tests
    # can check that a failing model step fails its requests and the engine goes on serving.
    fault_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise EngineConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise EngineConfigError(
                f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}"
            )
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise EngineConfigError(
                f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}"
            )
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_queue_len < 1:
            raise EngineConfigError(
                "max_num_seqs, max_num_batched_tokens and max_queue_len must be >= 1"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be auto or one of {sorted(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise EngineConfigError(
                f"--quantization {self.quantization!r}: only {', '.join(QUANTIZATIONS)}"
            )
        if self.tensor_parallel_size < 1:
            raise EngineConfigError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.devices is not None and len(self.devices) != self.tensor_parallel_size:
            raise EngineConfigError(
                f"{len(self.devices)} devices given for {self.tensor_parallel_size} ranks"
            )
        if self.threads is not None and self.threads < 1:
            raise EngineConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_queue_delay_s is not None and not self.max_queue_delay_s > 0:
            raise EngineConfigError(
                f"--max-queue-delay must be > 0 seconds, got {self.max_queue_delay_s}"
            )
        if any(step < 1 for step in self.fault_steps):
            raise EngineConfigError(f"fault steps are 1-based, got {self.fault_steps}")
        for device in (self.device, *(self.devices or ())):
            _check_device(device)

    def resolve_dtype(self, model_config: ModelConfig) -> torch.dtype:
        """The model's dtype as both services name it (the embeddings' dtype on the wire)."""
        return resolve_dtype(self.dtype, model_config.dtype, self.device, EngineConfigError)

    def model_dtypes(self, model_config: ModelConfig) -> tuple[torch.dtype, torch.dtype | None]:
        """(compute dtype, the routed experts' weight dtype where it differs).

        bf16 on a CPU without bf16 arithmetic (no AVX512-BF16 / AMX) computes in fp32 and keeps
        only the routed experts' weights, most of the parameters, in bf16: there bf16 matmuls
        are emulated, 5-7x slower than fp32 ones, while the C++ expert kernel widens bf16
        weights in registers for free and reads half the bytes. This holds for "auto" on a bf16
        checkpoint too, where the widened values are the checkpoint's own, exactly.
        """
        wire = self.resolve_dtype(model_config)
        wanted = model_config.dtype if self.dtype in (None, "auto") else wire
        dtype = compute_dtype(wanted, self.device)
        if dtype == wanted:
            return wire, None
        from shared.kernels import cpu as cpu_kernels  # builds the extension on first use

        # Without the kernel the reference would widen every expert's weights per call.
        return dtype, (wanted if cpu_kernels.available() else None)

    def weights_quantization(self, model_config: ModelConfig) -> str | None:
        """How the language model's weights are stored in memory: "fp8" (the checkpoint's, or
        quantized at load) or None."""
        if self.quantization is not None:
            return self.quantization
        return None if model_config.quantization is None else model_config.quantization.quant_method

    @property
    def cuda_graphs(self) -> bool:
        return torch.device(self.device).type == "cuda" and not self.enforce_eager

    def rank_devices(self) -> tuple[str, ...]:
        """The device of each tensor-parallel rank: `devices`, or cuda:0..N-1, or cpu N times."""
        n = self.tensor_parallel_size
        if self.devices is not None:
            return self.devices
        if torch.device(self.device).type == "cuda":
            first = torch.device(self.device).index or 0
            return tuple(f"cuda:{first + r}" for r in range(n))
        return (self.device,) * n

    def threads_per_rank(self) -> int | None:
        """CPU threads each rank uses: `threads`, else $OMP_NUM_THREADS or the usable cores,
        split between the ranks."""
        if self.threads is not None:
            return self.threads
        if torch.device(self.device).type != "cpu":
            return None
        available = os.environ.get("OMP_NUM_THREADS", "")
        cores = int(available) if available.isdigit() else len(os.sched_getaffinity(0))
        return max(1, cores // self.tensor_parallel_size)


def _check_device(device: str) -> None:
    """A device torch knows and this machine has; the message names --device."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EngineConfigError(
            f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if kind not in ("cpu", "cuda"):
        raise EngineConfigError(f"--device {device!r}: only cpu and cuda[:N] are supported")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(
            f"--device {device!r}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use --device cpu or install a CUDA build of torch"
        )
