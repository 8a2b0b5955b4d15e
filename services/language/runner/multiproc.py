"""Tensor-parallel execution: rank 0 in the service process, ranks 1..N-1 in spawned workers.

Rank 0 owns the scheduler and the KV block manager; every step's plan goes to every rank once,
by a broadcast on a gloo group (the plan is small: new requests once, then diffs), and all
ranks run the same forward, their collectives over NCCL on CUDA or gloo on CPU. Only rank 0
samples: seeds and sampling state then live in one place, and the sampled tokens reach the
workers with the next plan's diffs. Image embeddings travel inside the plan (as host tensors),
so no rank encodes again. Each rank loads only its slices of the weights.

A watcher thread waits on the workers' process sentinels: the moment one exits, idle or in the
middle of a step, `death()` says so (health turns 503 at once, not at the next step) and the
next step raises `WorkerDiedError`; workers also die with the service process (parent-death
signal), so none is left behind.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from services.language.runner.model_runner import ModelRunner
from services.language.runner.setup import RunnerSetup, build_runner, num_kv_blocks
from services.language.runner.step_plan import StepPlan
from shared.kernels.cpu.allocator import keep_freed_memory
from shared.model.config import load_config
from shared.model.parallel import ParallelLayout, load_parallel_text_model
from shared.wire.images import PendingImage

log = logging.getLogger(__name__)

_STOP = None  # the plan that tells workers to exit
_JOIN_TIMEOUT_S = 10.0
_DEATH_GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited; the engine cannot run steps any more."""


@dataclass(frozen=True)
class RankSpec:
    """What one rank needs to join the group and build its runner (picklable)."""

    rank: int
    world_size: int
    expert_parallel: bool
    model_dir: str
    dtype: torch.dtype
    expert_dtype: torch.dtype | None  # the routed experts' weights, where not `dtype`
    device: str
    setup: RunnerSetup
    quantization: str | None  # "fp8": quantize a float checkpoint's slices at load
    store_host: str
    store_port: int
    threads: int | None
    timeout_s: float

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"


def _init_groups(spec: RankSpec, store: dist.Store) -> dist.ProcessGroup:
    """The model group (default, NCCL or gloo) and the gloo group that carries plans."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    dist.init_process_group(
        spec.backend,
        store=dist.PrefixStore("model", store),
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timeout,
    )
    if spec.backend == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def load_rank(spec: RankSpec, control: dist.ProcessGroup) -> tuple[ModelRunner, int]:
    """This rank's sharded model and runner; all ranks agree on the smallest block count."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layout = ParallelLayout(spec.rank, spec.world_size, spec.expert_parallel)
    model, bytes_read = load_parallel_text_model(
        spec.model_dir, layout, None, spec.dtype, device, spec.expert_dtype, spec.quantization
    )
    config = load_config(spec.model_dir)
    blocks = torch.tensor([num_kv_blocks(model.eval(), config, spec.setup)])
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    log.info(
        "rank %d/%d on %s: read %.1f MiB of weights",
        spec.rank,
        spec.world_size,
        device,
        sum(bytes_read.values()) / 2**20,
    )
    return build_runner(model, config, spec.setup, int(blocks)), int(blocks)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_main(spec: RankSpec) -> None:
    """A worker rank: join, load, then run every broadcast plan until told to stop."""
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(name)s %(message)s"
    )
    if spec.device.split(":")[0] == "cpu":
        keep_freed_memory()
    store = dist.TCPStore(
        spec.store_host,
        spec.store_port,
        spec.world_size,
        False,
        datetime.timedelta(seconds=spec.timeout_s),
    )
    control = _init_groups(spec, store)
    runner, _ = load_rank(spec, control)
    dist.barrier(group=control)
    while (plan := receive_plan(control)) is not _STOP:
        runner.execute(plan)
    dist.barrier(group=control)
    # Skip interpreter teardown: gloo's threads can abort the process from static destructors.
    os._exit(0)


def send_plan(plan: StepPlan | None, control: dist.ProcessGroup) -> None:
    dist.broadcast_object_list([_host_images(plan)], src=0, group=control)


def receive_plan(control: dist.ProcessGroup) -> StepPlan | None:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def _host_images(plan: StepPlan | None) -> StepPlan | None:
    """Images that arrived on rank 0's GPU (link transport) travel as host tensors: a pickled
    CUDA tensor would land on the wrong device in the worker. Placeholders travel as they are."""
    if plan is None:
        return plan
    images = [im for r in plan.new_requests for im in r.images]
    images += [im for d in plan.diffs for _, im in d.new_images]
    if not any(getattr(im, "packed", None) is not None and im.packed.is_cuda for im in images):
        return plan
    new = tuple(replace(r, images=tuple(map(_on_host, r.images))) for r in plan.new_requests)
    diffs = tuple(
        replace(d, new_images=tuple((i, _on_host(im)) for i, im in d.new_images))
        for d in plan.diffs
    )
    return replace(plan, new_requests=new, diffs=diffs)


def _on_host(image):
    if isinstance(image, PendingImage):
        return image
    return replace(image, packed=image.packed.cpu())


class MultiprocExecutor:
    """The Executor over N ranks; construct with `start`."""

    def __init__(self, runner: ModelRunner, workers: list, control, num_blocks: int):
        self._runner = runner
        self._workers = workers
        self._control = control
        self.num_blocks = num_blocks
        self._dead: str | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._watcher = threading.Thread(target=self._watch, name="tp-worker-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Block on the workers' sentinels; the first to exit marks the executor dead."""
        ready = multiprocessing.connection.wait([proc.sentinel for proc in self._workers])
        if self._stopping or self._dead is not None:
            return
        rank, proc = next(
            (rank, proc)
            for rank, proc in enumerate(self._workers, start=1)
            if proc.sentinel in ready
        )
        proc.join(_DEATH_GRACE_S)  # the sentinel fires before the exit status can be read
        self._dead = (
            f"tensor-parallel rank {rank} (pid {proc.pid}) exited with status {proc.exitcode}"
        )
        log.error("%s; the engine cannot run steps any more", self._dead)

    @classmethod
    def start(cls, specs: list[RankSpec]) -> MultiprocExecutor:
        """Spawn ranks 1..N-1, then join as rank 0 (the store's host) and load in parallel."""
        first = specs[0]
        store = dist.TCPStore(
            first.store_host,
            0,
            first.world_size,
            True,
            datetime.timedelta(seconds=first.timeout_s),
            wait_for_workers=False,
        )
        context = mp.get_context("spawn")
        workers = []
        for spec in specs[1:]:
            spec = replace(spec, store_port=store.port)
            proc = context.Process(
                target=worker_main, args=(spec,), daemon=True, name=f"tp-rank{spec.rank}"
            )
            proc.start()
            workers.append(proc)
        try:
            control = _init_groups(first, store)
            runner, num_blocks = load_rank(first, control)
            dist.barrier(group=control)
        except Exception:
            for proc in workers:
                proc.kill()
            raise
        log.info(
            "tensor parallel: %d ranks ready (worker pids %s)",
            first.world_size,
            [p.pid for p in workers],
        )
        return cls(runner, workers, control, num_blocks)

    @property
    def device(self) -> torch.device:
        return self._runner.device

    def death(self) -> str | None:
        return self._dead

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        if self._dead is not None or self._stopping:
            raise WorkerDiedError(self._dead or "the tensor-parallel workers were shut down")
        try:
            send_plan(plan, self._control)
            return self._runner.execute(plan)
        except Exception as exc:
            # After a failed step the ranks are out of step: the group is unusable either way.
            # A worker that died is usually why; give the OS a moment to report it.
            self._dead = self._worker_death(_DEATH_GRACE_S) or f"a step failed on rank 0: {exc!r}"
            raise WorkerDiedError(self._dead) from exc

    def _worker_death(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self._workers, start=1):
                if not proc.is_alive():
                    return (
                        f"tensor-parallel rank {rank} (pid {proc.pid}) exited with status "
                        f"{proc.exitcode}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True  # workers exiting now are not a death
            if self._dead is None and all(p.is_alive() for p in self._workers):
                try:
                    send_plan(_STOP, self._control)
                    dist.barrier(group=self._control)
                except Exception:  # noqa: BLE001 - stopping anyway
                    log.warning("tensor-parallel workers did not stop cleanly", exc_info=True)
            for proc in self._workers:
                proc.join(_JOIN_TIMEOUT_S)
                if proc.is_alive():
                    proc.kill()
                    proc.join(_JOIN_TIMEOUT_S)
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - a group with a dead peer may refuse
                    log.debug("destroying the tensor-parallel group failed", exc_info=True)
