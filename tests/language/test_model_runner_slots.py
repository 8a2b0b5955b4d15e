"""Cache slots of a chunk: every token's block entry and offset, across block boundaries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.language.model_runner import ModelRunner


@pytest.mark.parametrize(("start", "end"), [(0, 1), (0, 16), (3, 5), (5, 12), (4, 8), (11, 12)])
def test_slots_match_the_per_token_block_formula(start, end):
    runner = object.__new__(ModelRunner)  # _slots reads only the block size
    runner.block_size = 4
    seq = SimpleNamespace(block_ids=[7, 2, 9, 0])
    expected = [seq.block_ids[i // 4] * 4 + i % 4 for i in range(start, end)]
    assert runner._slots(seq, start, end) == expected
