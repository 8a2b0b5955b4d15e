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
from pathlib import Path

import torch

from services.common.placement import CorePlacement, apply_share
from services.language.engine.admission import AdmissionControl
from services.language.engine.config import EngineConfig
from services.language.engine.core import EngineCore, EngineStats
from services.language.engine.request import (
    EngineDeadError,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
)
from services.language.engine.tokenizer import LanguageTokenizer
from shared.model.config import ModelConfig

__all__ = [
    "AsyncEngine",
    "EngineClosedError",
    "EngineConfig",
    "EngineStepError",
    "EngineStats",
    "InvalidRequestError",
    "QueueFullError",
]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
Cores = CorePlacement | None  # this service's share of the host's cores, if it takes one
_SHUTDOWN_TIMEOUT_S = 30.0


class EngineStepError(RuntimeError):
    """A model step raised; the requests it carried were failed, the engine serves on (500)."""


class EngineClosedError(EngineDeadError):
    """The engine takes no more requests (the service is shutting down): retry elsewhere."""


class InjectedStepFault(RuntimeError):
    """Raised by the fault-injection test hook (EngineConfig.fault_steps)."""


class _FaultyExecutor:
    """Test hook: the real executor, except that the listed steps raise before running."""

    def __init__(self, executor, fault_steps: tuple[int, ...]) -> None:
        self._executor = executor
        self._fault_steps = frozenset(fault_steps)
        self.num_steps = 0

    def execute(self, plan):
        self.num_steps += 1
        if self.num_steps in self._fault_steps:
            raise InjectedStepFault(f"injected fault in step {self.num_steps}")
        return self._executor.execute(plan)

    def __getattr__(self, name: str):
        return getattr(self._executor, name)


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


class AsyncEngine:
    """asyncio front of the engine: ``generate`` streams outputs, leaving the stream aborts."""

    def __init__(self, core: EngineCore, config: EngineConfig, placement: Cores = None):
        self._core = core
        self.config = config
        self._placement = placement  # the share of a host's cores, applied before each step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        # Requests sent to the engine thread, and those it took (each counter has one writer);
        # the difference is what is on its way to the waiting queue
        self._num_sent = 0
        self._num_taken = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fatal: str | None = None  # why the engine can no longer serve, once it cannot
        self._closed: str | None = None  # why new requests are refused (shutting down)
        self.admission = AdmissionControl(config.max_queue_delay_s)
        if config.fault_steps:
            log.warning("fault injection on: steps %s will raise (a test hook)", config.fault_steps)
            core.executor = _FaultyExecutor(core.executor, config.fault_steps)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, config: EngineConfig, placement: Cores = None
    ) -> AsyncEngine:
        """Load the text weights and tokenizer of ``model_dir`` and build the engine."""
        from services.language.engine.build import build_engine_core

        return cls(build_engine_core(model_dir, config), config, placement)

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

    @property
    def fatal_error(self) -> str | None:
        """Why the engine stopped serving for good (a tensor-parallel worker died), or None.
        Read from the executor too: a worker's death is known at once, even while the engine
        thread still waits in the step it broke."""
        return self._fatal or self._core.executor.death()

    def health(self) -> tuple[bool, str]:
        """(serving, reason): False when stopped, fatally failed or its thread is gone."""
        fatal = self.fatal_error
        if fatal is not None:
            return False, fatal
        if self._thread is None or not self._thread.is_alive():
            return False, "the engine is not running"
        return True, "ok"

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
        await asyncio.to_thread(self._core.executor.shutdown)
        error = EngineDeadError("the engine was shut down")
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
        if self._fatal is not None:
            raise EngineDeadError(f"the engine cannot serve: {self._fatal}")
        if self._closed is not None:
            raise EngineClosedError(self._closed)
        self._core.validate(request)
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        waiting = self._core.scheduler.num_waiting + self._num_sent - self._num_taken
        if waiting >= self.config.max_queue_len:
            raise QueueFullError(
                f"{waiting} requests are already waiting (max_queue_len "
                f"{self.config.max_queue_len}); retry later"
            )
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._num_sent += 1
        self._send(("add", request, None))
        return OutputStream(request.request_id, stream, self._release)

    def _release(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._send(("abort", request_id, None))

    def provide_images(self, request_id: str, items: list[tuple[int, object]]) -> None:
        """Hand over images a request was submitted without (PendingImage placeholders), as
        (index, EncodedImage); one that does not match its placeholder fails the request."""
        if self._serving_thread():
            self._send(("images", (request_id, items), None))

    def fail_request(self, request_id: str, error: Exception) -> None:
        """End one request now with `error` (its images could not be encoded)."""
        if self._serving_thread():
            self._send(("fail_one", (request_id, error), None))

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id`` and wait until its KV blocks are free (no-op if unknown)."""
        if not self._serving_thread():
            return  # a stopped engine thread holds no request any more
        done = asyncio.get_running_loop().create_future()
        self._send(("abort", request_id, done))
        await asyncio.wait_for(done, _SHUTDOWN_TIMEOUT_S)

    @property
    def num_live_streams(self) -> int:
        """Requests whose output stream is still open."""
        return len(self._streams)

    def close(self, reason: str) -> None:
        """Refuse every later ``generate`` with EngineClosedError(reason); live requests go on."""
        self._closed = reason

    async def fail_all(self, reason: str) -> None:
        """End every live request now with EngineClosedError(reason), freeing its KV blocks."""
        if not self._serving_thread():
            return
        done = asyncio.get_running_loop().create_future()
        self._send(("fail", EngineClosedError(reason), done))
        await asyncio.wait_for(done, _SHUTDOWN_TIMEOUT_S)

    def _serving_thread(self) -> bool:
        """Whether the engine thread will still answer commands. A fatal failure counts as gone
        at once: the thread fails every request and returns, and a command sent while it is
        still returning would wait for an answer that never comes."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._fatal is None

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the commands are read: one sent after this wakes the waits below
            self._wakeup.clear()
            self._drain_commands()
            if not self._core.has_work():
                if self._core.executor.death() is not None and self._check_fatal(None):
                    return  # a worker died while idle: nothing can run any more
                self._wakeup.wait(_IDLE_WAIT_S)
                continue
            try:
                apply_share(self._placement)
                outputs = self._core.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the thread
                if self._check_fatal(exc):
                    return
                log.exception("engine step failed; failing its requests")
                # The step's state on the runner side is unknown, so every live request ends;
                # the ones that arrive next start from a clean slate.
                self._fail_all(
                    EngineStepError(
                        f"the model step running this request failed ({type(exc).__name__}); "
                        "the request was not completed and can be retried"
                    )
                )
                continue
            if outputs:
                self._publish(outputs)
            elif self._core.stalled:  # every request waits for an image: sleep until one comes
                self._wakeup.wait(_IDLE_WAIT_S)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(payload)
            elif kind == "images":
                self._provide(*payload)
            elif kind == "fail_one":
                self._fail_one(*payload)
            elif kind == "fail":
                self._fail_all(payload)
                self._loop.call_soon_threadsafe(_resolve, done)
            else:
                final = self._core.abort_request(payload)
                if final is not None:
                    self._publish([final])
                if done is not None:
                    self._loop.call_soon_threadsafe(_resolve, done)

    def _add(self, request: GenerationRequest) -> None:
        # Counted before the queue holds it: a reader may miss one request, never count one
        # twice (a burst of submissions would otherwise fill the bound with phantoms)
        self._num_taken += 1
        try:
            self._core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - reported to the request's stream
            self._loop.call_soon_threadsafe(self._deliver_error, request.request_id, exc)

    def _provide(self, request_id: str, items) -> None:
        try:
            self._core.provide_images(request_id, items)
        except InvalidRequestError as exc:
            self._fail_one(request_id, exc)

    def _fail_one(self, request_id: str, error: Exception) -> None:
        if self._core.abort_request(request_id) is not None:
            self._loop.call_soon_threadsafe(self._deliver_error, request_id, error)

    def _check_fatal(self, exc: Exception | None) -> bool:
        """After a failed step (or an idle check): if the executor is gone, fail everything and
        stop for good."""
        death = self._core.executor.death()
        if death is None:
            return False
        self._fatal = death
        log.error("engine stopped: %s (step error: %r)", self._fatal, exc)
        self._fail_all(EngineDeadError(f"the engine stopped: {self._fatal}"))
        return True

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
