"""Continuous batching: token budget, chunked prefill, decode priority, preemption, FCFS."""

from __future__ import annotations

import pytest

from services.language.engine.kv_blocks import BlockManager
from services.language.engine.request import SequenceStatus
from services.language.engine.scheduler import Scheduler, SchedulerConfig
from tests.language.conftest import make_sequence
from tests.tiny import IMAGE_TOKEN_ID

BS = 4


def _scheduler(num_blocks=64, max_num_seqs=8, budget=16, prefix=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        BlockManager(num_blocks, BS, enable_prefix_caching=prefix),
    )


def _step(sched: Scheduler, next_token: int = 1):
    """Schedule, pretend the model ran, append a token to every sampling sequence."""
    out = sched.schedule()
    sched.complete_step(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(next_token)
    return out


def test_config_rejects_empty_budget():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=0)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = _scheduler(budget=16)
    seq = make_sequence(list(range(40)))
    sched.add(seq)
    sizes = []
    while seq.num_output_tokens == 0:
        out = _step(sched)
        assert out.num_batched_tokens <= 16
        sizes.append([(c.start, c.num_tokens, c.samples) for c in out.chunks])
    assert sizes == [[(0, 16, False)], [(16, 16, False)], [(32, 8, True)]]


def test_decodes_are_scheduled_before_prefills_and_share_the_step():
    sched = _scheduler(budget=10)
    first = make_sequence([1, 2, 3], request_id="a")
    sched.add(first)
    _step(sched)  # prefill a, sample its first token
    second = make_sequence(list(range(30)), request_id="b")
    sched.add(second)
    out = _step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]


def test_max_num_seqs_bounds_the_running_set():
    sched = _scheduler(max_num_seqs=2, budget=100)
    seqs = [make_sequence([i, i + 1], request_id=str(i)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    out = _step(sched)
    assert {c.seq.request_id for c in out.chunks} == {"0", "1"}
    assert sched.num_running == 2 and sched.num_waiting == 1


def test_admission_is_first_come_first_served():
    # The head of the queue does not fit; a smaller request behind it must not jump ahead.
    sched = _scheduler(num_blocks=6, budget=100)
    running = make_sequence(list(range(12)), request_id="running")  # 3 blocks
    sched.add(running)
    _step(sched)
    big = make_sequence([5] * 16, request_id="big")  # needs 4 blocks; 2 left
    small = make_sequence([1, 2], request_id="small")
    sched.add(big)
    sched.add(small)
    out = _step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["running"]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]
    sched.finish(running, "stop")
    out = _step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["big", "small"]


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    sched = _scheduler(num_blocks=4, budget=100, prefix=False)
    old = make_sequence([1] * 8, request_id="old")  # 2 blocks, full
    new = make_sequence([2] * 8, request_id="new")
    sched.add(old)
    sched.add(new)
    _step(sched)  # both prefilled; each needs a third block for its next token
    out = _step(sched)
    assert [s.request_id for s in out.preempted] == ["new"]
    assert [c.seq.request_id for c in out.chunks] == ["old"]
    assert new.status is SequenceStatus.WAITING and new.block_ids == []
    assert new.num_computed_tokens == 0 and new.num_output_tokens == 1  # kept, recomputed later
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    sched.finish(old, "stop")
    out = _step(sched)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("new", 0, 9)]


def test_lone_sequence_preempting_itself_does_not_spin():
    sched = _scheduler(num_blocks=2, budget=100, prefix=False)
    seq = make_sequence([1] * 8)
    sched.add(seq)
    _step(sched)
    out = sched.schedule()  # needs a third block: nothing else to preempt
    assert out.chunks == () and out.preempted == (seq,)
    assert sched.waiting[0] is seq


def test_finish_frees_blocks_from_any_state():
    sched = _scheduler(num_blocks=8)
    running, waiting = make_sequence([1] * 5, request_id="a"), make_sequence([2] * 5)
    sched.add(running)
    _step(sched)
    sched.add(waiting)
    sched.finish(running, "abort")
    sched.finish(waiting, "abort")
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_work()
    assert running.finish_reason == "abort" and running.status is SequenceStatus.FINISHED


def test_prefix_hit_skips_cached_tokens_and_is_counted():
    sched = _scheduler(budget=100)
    first = make_sequence(list(range(10)), request_id="a")
    sched.add(first)
    _step(sched)
    second = make_sequence(list(range(10)), request_id="b")
    sched.add(second)
    out = _step(sched)
    chunk = next(c for c in out.chunks if c.seq is second)
    assert (chunk.start, chunk.num_tokens) == (8, 2)
    assert second.num_cached_tokens == 8
    assert sched.block_manager.prefix_cache_hits == 8


def _pending_image_sequence(text_before: int, request_id: str):
    """`text_before` text tokens, then a pending 3-token image, then 2 text tokens."""
    from shared.wire.images import PendingImage

    ids = list(range(100, 100 + text_before)) + [IMAGE_TOKEN_ID] * 3 + [7, 8]
    image = PendingImage((1, 2, 6), 3, f"h{request_id}")
    return make_sequence(ids, (image,), request_id=request_id)


def test_a_short_piece_before_a_pending_image_waits_for_other_work():
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, min_lone_piece=8),
        BlockManager(64, BS, enable_prefix_caching=True),
    )
    short = _pending_image_sequence(5, "short")
    sched.add(short)
    out = _step(sched)
    assert out.plan.is_empty and short.status is SequenceStatus.WAITING  # no step of its own
    # With other work in the step, the same piece rides along.
    sched.add(make_sequence([1, 2, 3], request_id="text"))
    out = _step(sched)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("text", 3), ("short", 5)]
    # A long enough piece runs alone; so does a short one with `min_lone_piece` 0.
    long = _pending_image_sequence(9, "long")
    alone = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, min_lone_piece=8),
        BlockManager(64, BS, enable_prefix_caching=True),
    )
    alone.add(long)
    assert [c.num_tokens for c in _step(alone).chunks] == [9]
    eager = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, min_lone_piece=0),
        BlockManager(64, BS, enable_prefix_caching=True),
    )
    eager.add(_pending_image_sequence(5, "eager"))
    assert [c.num_tokens for c in _step(eager).chunks] == [5]
