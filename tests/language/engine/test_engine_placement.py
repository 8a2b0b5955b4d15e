"""The engine thread applies its share of the host's cores (services.common.placement) before
each step: torch's intra-op thread count holds per thread, so setting it anywhere else would
not reach the steps."""

from __future__ import annotations

import asyncio

import torch

from services.common import placement
from services.common.placement import Claim, CorePlacement, write_claim


def test_the_engine_thread_applies_its_share(tmp_path, other_process, tiny_vl_model_dir):
    """Three cores registered for this engine (whatever this machine has, so the count is not
    a default): its steps run on three threads."""
    from services.language.engine import AsyncEngine, EngineConfig
    from tests.language.conftest import collect, greedy_request, make_prompt_case

    cores = CorePlacement("language", tmp_path, cores=3)
    pid = other_process.pid
    write_claim(tmp_path, Claim(pid, "encode", placement.start_time(pid)))
    config = EngineConfig(kv_cache_memory=1 << 22, max_model_len=128, warm_up=False)
    engine = AsyncEngine.from_model_dir(tiny_vl_model_dir, config, cores)
    seen = []
    execute = engine._core.executor.execute

    def record(plan):
        seen.append(torch.get_num_threads())
        return execute(plan)

    engine._core.executor.execute = record
    case = make_prompt_case(None, [6], [], 0)

    async def main():
        await engine.start()
        try:
            await collect(engine, [greedy_request("r", case, 3)])
        finally:
            await engine.shutdown()

    before = torch.get_num_threads()
    asyncio.run(main())
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before  # this thread's count is its own
    cores.close()
