"""The asynchronous language engine used by the HTTP and gRPC servers.

Model compute runs on one dedicated thread that owns all engine state (scheduler, blocks,
sequences); the event loop only validates, enqueues commands and receives outputs through
``call_soon_threadsafe``, so a long prefill never blocks the servers' I/O.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from services.language.engine.core import EngineCore, EngineStats
from services.language.engine.kv_cache import BlockManager
from services.language.engine.scheduler import Scheduler, SchedulerConfig
from services.language.request import (
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
)
from services.language.runner.executor import LocalExecutor
from services.language.runner.kv_pool import KVCache, KVCacheSpec
from services.language.runner.model_runner import ModelRunner, RunnerConfig
from services.language.tokenizer import LanguageTokenizer
from shared.model.config import DTYPES, ModelConfig, load_config
from shared.model.loader import load_text_model
from shared.model.qwen3_moe import Qwen3MoeForCausalLM
from shared.wire.units import resolve_dtype

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineStats",
    "InvalidRequestError",
    "QueueFullError",
]

log = logging.getLogger(__name__)

# Without a GPU there is no free-memory probe; this caps the CPU pool when no budget is given.
_CPU_DEFAULT_KV_BYTES = 1 << 30
_IDLE_WAIT_S = 0.05
_SHUTDOWN_TIMEOUT_S = 30.0


class OutputStream:
    """One request's outputs. Closing it before the last output (``aclose``, cancellation of the
    consuming task, or never iterating it at all and closing) aborts the request."""

    def __init__(self, request_id: str, queue: asyncio.Queue, release) -> None:
        self.request_id = request_id
        self._queue = queue
        self._release = release
        self._done = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._finish(True)
            raise item
        if item.finished:
            self._finish(True)
        return item

    def _finish(self, finished: bool) -> None:
        if not self._done:
            self._done = True
            self._release(self.request_id, finished)

    async def aclose(self) -> None:
        """Stop reading; aborts the request (freeing its KV blocks) unless it already ended."""
        self._finish(False)

    def __del__(self) -> None:
        # A consumer that dropped the stream without closing it still frees the request.
        self._finish(False)


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
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_queue_len: int = 1024
    dtype: str = "auto"  # "auto": the checkpoint's (float32 on a CPU without native bf16)
    device: str = "cpu"
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # Pad decode-only steps to capture sizes; None: only where graphs replay them (CUDA).
    pad_decodes: bool | None = None

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

    def resolve_dtype(self, model_config: ModelConfig) -> torch.dtype:
        return resolve_dtype(self.dtype, model_config.dtype, self.device, EngineConfigError)

    @property
    def cuda_graphs(self) -> bool:
        return torch.device(self.device).type == "cuda" and not self.enforce_eager


def _kv_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_fraction)
    return _CPU_DEFAULT_KV_BYTES


def build_engine_core(
    model: Qwen3MoeForCausalLM,
    model_config: ModelConfig,
    tokenizer: LanguageTokenizer,
    config: EngineConfig,
) -> EngineCore:
    """Wire a loaded model into a ready engine core (KV pool sized from the budget)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text = model_config.text
    spec = KVCacheSpec(
        text.num_hidden_layers, text.num_key_value_heads, text.head_dim, config.block_size, dtype
    )
    num_blocks = spec.num_blocks_for(_kv_budget(config, device))
    max_model_len = config.max_model_len or text.max_position_embeddings
    # No point holding more blocks than every sequence could ever fill at once.
    needed = config.max_num_seqs * -(-max_model_len // config.block_size)
    if config.kv_cache_memory is None:
        num_blocks = min(num_blocks, needed)
    kv_cache = KVCache(spec, num_blocks, device)
    pad = config.cuda_graphs if config.pad_decodes is None else config.pad_decodes
    runner_config = RunnerConfig(
        config.max_num_seqs, config.max_num_batched_tokens, max_model_len, config.block_size,
        pad_decodes=pad or config.cuda_graphs, cuda_graphs=config.cuda_graphs,
    )  # fmt: skip
    runner = ModelRunner(model, model_config, kv_cache, runner_config)
    if runner.graphs is not None:
        runner.graphs.capture()
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), block_manager
    )
    return EngineCore(
        LocalExecutor(runner), scheduler, model_config, tokenizer, max_model_len, dtype
    )


class AsyncEngine:
    """asyncio front of the engine: ``generate`` streams outputs, leaving the stream aborts."""

    def __init__(self, core: EngineCore, config: EngineConfig):
        self._core = core
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_submitted = 0  # added but not yet seen by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig) -> AsyncEngine:
        """Load the text weights and tokenizer of ``model_dir`` and build the engine."""
        model_config = load_config(model_dir)
        device = torch.device(config.device)
        model = load_text_model(
            model_dir, dtype=config.resolve_dtype(model_config), device=device
        ).eval()
        tokenizer = LanguageTokenizer.from_model_dir(model_dir)
        return cls(build_engine_core(model, model_config, tokenizer, config), config)

    @property
    def tokenizer(self) -> LanguageTokenizer:
        return self._core.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self._core.model_config

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (what image embeddings must arrive in)."""
        return self._core.dtype

    def stats(self) -> EngineStats:
        # Plain integer reads of engine-thread state: a snapshot, possibly one step old.
        return self._core.stats()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._wakeup.set()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, _SHUTDOWN_TIMEOUT_S)
        error = RuntimeError("the engine was shut down")
        for stream in self._streams.values():
            stream.put_nowait(error)
        self._streams.clear()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue ``request`` and return its output stream.

        Raises InvalidRequestError or QueueFullError right away; closing the stream before
        it finishes (``aclose``, task cancellation) aborts the request.
        """
        if self._thread is None:
            raise RuntimeError("call await engine.start() before generate()")
        self._core.validate(request)
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        waiting = self._core.scheduler.num_waiting + self._num_submitted
        if waiting >= self.config.max_queue_len:
            raise QueueFullError(
                f"{waiting} requests are already waiting (max_queue_len "
                f"{self.config.max_queue_len}); retry later"
            )
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._num_submitted += 1
        self._send(("add", request, None))
        return OutputStream(request.request_id, stream, self._release)

    def _release(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._send(("abort", request_id, None))

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` and wait until its KV blocks are free (no-op if unknown)."""
        if self._thread is None:
            return
        done = asyncio.get_running_loop().create_future()
        self._send(("abort", request_id, done))
        await asyncio.wait_for(done, _SHUTDOWN_TIMEOUT_S)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_commands()
            if not self._core.has_work():
                self._wakeup.wait(_IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            try:
                outputs = self._core.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the thread
                log.exception("engine step failed; failing its requests")
                self._fail_all(exc)
                continue
            if outputs:
                self._publish(outputs)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(payload)
            else:
                final = self._core.abort_request(payload)
                if final is not None:
                    self._publish([final])
                if done is not None:
                    self._loop.call_soon_threadsafe(_resolve, done)

    def _add(self, request: GenerationRequest) -> None:
        try:
            self._core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - reported to the request's stream
            self._loop.call_soon_threadsafe(self._deliver_error, request.request_id, exc)
        finally:
            self._loop.call_soon_threadsafe(self._submitted)

    def _submitted(self) -> None:
        self._num_submitted -= 1

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._core.live_request_ids()):
            self._core.abort_request(request_id)
            self._loop.call_soon_threadsafe(self._deliver_error, request_id, exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _deliver_error(self, request_id: str, exc: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
