"""A step at the largest size a step can have, run once before the engine takes requests.

On a CPU the first step of a new size pays for what every later one reuses: oneDNN generates
its bf16 GEMM kernels per shape, and the heap grows to the step's high-water mark (fresh pages
fault in one by one; see `shared.kernels.cpu.allocator`). A 2048-token step of the `wide`
bench shape took 2.3-3.0 s the first time and 1.5 s once warm (fp32, 2 cores): without this,
the first long prompts a server sees pay it. vLLM runs such a step at start-up too (its memory
profile run).

The plan is ordinary: text-only dummy requests (token 0) in the first blocks of the pool, which
no request owns yet, then a plan that forgets them. Their K/V stays behind in blocks the
scheduler hands out later as free, and every block is written before it is read, so nothing
of them can reach a request; the prefix cache only offers blocks that requests filled.
"""

from __future__ import annotations

import logging
import time

from services.language.runner.executor import Executor
from services.language.runner.model_runner import RunnerConfig
from services.language.runner.step_plan import NewRequest, ScheduledChunk, StepPlan

log = logging.getLogger(__name__)

_ID = "warm-up-{}"


def warm_up_plans(config: RunnerConfig, num_blocks: int) -> tuple[StepPlan, StepPlan]:
    """(the step, the plan that forgets its requests): ``max_num_batched_tokens`` tokens, as
    few requests of at most ``max_model_len`` tokens as carry them, within the pool."""
    requests: list[NewRequest] = []
    chunks: list[ScheduledChunk] = []
    left, next_block = config.max_num_batched_tokens, 0
    while left > 0 and len(requests) < config.max_num_seqs:
        room = (num_blocks - next_block) * config.block_size
        n = min(left, config.max_model_len, room)
        if n <= 0:
            break
        blocks = -(-n // config.block_size)
        rid = _ID.format(len(requests))
        block_ids = tuple(range(next_block, next_block + blocks))
        requests.append(NewRequest(rid, (0,) * n, n, (), block_ids, 0))
        chunks.append(ScheduledChunk(rid, n, samples=True))
        left, next_block = left - n, next_block + blocks
    step = StepPlan((), tuple(requests), (), tuple(chunks))
    forget = StepPlan(tuple(r.request_id for r in requests), (), (), ())
    return step, forget


def warm_up(executor: Executor, config: RunnerConfig, num_blocks: int) -> float:
    """Run the warm-up step on every rank; returns (and logs) the seconds it took."""
    step, forget = warm_up_plans(config, num_blocks)
    start = time.perf_counter()
    if step.chunks:
        executor.execute(step)
        executor.execute(forget)
    took = time.perf_counter() - start
    log.info(
        "warm-up step: %d tokens in %d requests, %.2f s", step.num_tokens, len(step.chunks), took
    )
    return took
