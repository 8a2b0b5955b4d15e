"""The asyncio contract: abort frees blocks, leaving a stream aborts, typed admission errors."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from services.language.engine import AsyncEngine, EngineConfig, InvalidRequestError, QueueFullError
from services.language.engine.request import GenerationRequest, SamplingParams
from shared.wire.images import EncodedImage
from tests.tiny import IMAGE_TOKEN_ID


def _request(rid: str, num_prompt: int = 12, max_tokens: int = 200, images=()) -> GenerationRequest:
    ids = tuple((7 * i + len(rid)) % 250 for i in range(num_prompt))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return GenerationRequest(rid, ids, tuple(images), params, time.time())


def _run(model_dir, body, **config):
    async def main():
        engine = AsyncEngine.from_model_dir(
            model_dir, EngineConfig(**{"kv_cache_memory": 1 << 22, "max_model_len": 512, **config})
        )
        await engine.start()
        try:
            return await asyncio.wait_for(body(engine), timeout=60)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def test_abort_ends_the_stream_and_frees_every_block(tiny_vl_model_dir):
    async def body(engine):
        stream = engine.generate(_request("a"))
        first = await anext(stream)
        assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
        await engine.abort("a")
        stats = engine.stats()
        rest = [out async for out in stream]
        return first, rest, stats

    first, rest, stats = _run(tiny_vl_model_dir, body)
    assert not first.finished
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


def test_leaving_the_stream_early_or_cancelling_aborts(tiny_vl_model_dir):
    async def body(engine):
        stream = engine.generate(_request("closed"))
        await anext(stream)
        await stream.aclose()

        async def consume():
            async for _ in engine.generate(_request("cancelled")):
                pass

        task = asyncio.create_task(consume())
        await _wait_until(lambda: engine.stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_until(lambda: engine.stats().num_running == 0)
        return engine.stats()

    stats = _run(tiny_vl_model_dir, body)
    assert stats.num_free_blocks == stats.num_total_blocks


def test_full_queue_and_invalid_requests_raise_at_once(tiny_vl_model_dir):
    async def body(engine):
        streams = [engine.generate(_request(f"q{i}", max_tokens=3)) for i in range(2)]
        with pytest.raises(QueueFullError, match="max_queue_len 2"):
            engine.generate(_request("overflow"))
        with pytest.raises(InvalidRequestError, match="600 tokens.*max_model_len is 512"):
            engine.generate(_request("long", num_prompt=600))
        image = EncodedImage(torch.zeros(3, 192), (1, 2, 6), "h")
        with pytest.raises(InvalidRequestError, match="2 image and video pad tokens.*3 embedding"):
            engine.generate(
                GenerationRequest(
                    "pads",
                    (1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 2),
                    (image,),
                    SamplingParams(),
                    time.time(),
                )
            )
        results = [[o async for o in s] for s in streams]
        return results, engine.stats()

    results, stats = _run(tiny_vl_model_dir, body, max_queue_len=2)
    assert [r[-1].num_output_tokens for r in results] == [3, 3]
    assert stats.num_free_blocks == stats.num_total_blocks


def test_max_model_len_ends_generation_with_length(tiny_vl_model_dir):
    async def body(engine):
        return [o async for o in engine.generate(_request("edge", num_prompt=30, max_tokens=50))]

    outs = _run(tiny_vl_model_dir, body, max_model_len=32)
    assert outs[-1].finish_reason == "length"
    assert outs[-1].num_output_tokens == 2  # 30 prompt + 2 output = max_model_len


def test_closing_a_stream_never_iterated_aborts(tiny_vl_model_dir):
    async def body(engine):
        stream = engine.generate(_request("never-read"))
        await _wait_until(lambda: engine.stats().num_running == 1)
        await stream.aclose()
        await _wait_until(lambda: engine.stats().num_running == 0)
        # The request id is free again: its stream entry was released too.
        again = engine.generate(_request("never-read", max_tokens=2))
        outputs = [out async for out in again]
        return outputs, engine.stats()

    outputs, stats = _run(tiny_vl_model_dir, body)
    assert outputs[-1].finish_reason == "length"
    assert stats.num_free_blocks == stats.num_total_blocks


class _DyingExecutor:
    """The real executor, except that a step fails the way a dead tensor-parallel worker does."""

    def __init__(self, executor) -> None:
        self._executor = executor
        self.dead = False

    def execute(self, plan):
        if self.dead:
            raise RuntimeError("connection reset by a worker")
        return self._executor.execute(plan)

    def death(self) -> str | None:
        return "tensor-parallel rank 1 exited with status -9" if self.dead else None

    def __getattr__(self, name: str):
        return getattr(self._executor, name)


def test_a_dead_executor_fails_streams_and_abort_returns_at_once(tiny_vl_model_dir, monkeypatch):
    """The engine thread fails every request and returns; until it has returned, an abort (the
    front end sends one for every stream that ended in an error) must not wait for it."""

    async def body(engine):
        dying = _DyingExecutor(engine._core.executor)
        engine._core.executor = dying
        fail_all = engine._fail_all

        def slow_fail_all(exc):  # the thread lingers after failing its requests
            fail_all(exc)
            time.sleep(2.0)

        monkeypatch.setattr(engine, "_fail_all", slow_fail_all)
        stream = engine.generate(_request("a"))
        await anext(stream)
        dying.dead = True
        with pytest.raises(Exception, match="engine stopped"):
            async for _ in stream:
                pass
        start = time.monotonic()
        await engine.abort("a")
        return time.monotonic() - start, engine.health()

    waited, (serving, reason) = _run(tiny_vl_model_dir, body)
    assert waited < 1.0
    assert not serving and "rank 1" in reason
