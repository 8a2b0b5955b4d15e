"""The MoE tile tuner's CPU-side logic: the candidate grid, the choice, the JSON it writes (which
the tile loader reads back), and the refusal without a GPU. The timing itself needs CUDA."""

from __future__ import annotations

import json

import pytest

from tests.kernels.triton_env import IN_PROCESS  # noqa: F401 - before triton is imported

pytest.importorskip("triton")

from bench import kernels_triton, moe_tune  # noqa: E402
from shared.kernels.gpu import tiles  # noqa: E402

A3B = moe_tune.MoeShape(num_experts=128, hidden=2048, inter=768, top_k=8)


@pytest.mark.parametrize("num_tokens", moe_tune.BUCKETS)
def test_candidates_fit_the_gpu_and_include_the_shipped_choice(num_tokens):
    found = moe_tune.candidates(num_tokens, A3B)
    assert found and len({json.dumps(c, sort_keys=True) for c in found}) == len(found)
    for c in found:
        assert set(c) == set(tiles.KEYS)
        smem = c["num_stages"] * (c["BLOCK_SIZE_M"] + 2 * c["BLOCK_SIZE_N"]) * c["BLOCK_SIZE_K"]
        assert smem * 2 <= moe_tune.SHARED_MEMORY_LIMIT
    tallest = max(c["BLOCK_SIZE_M"] for c in found)
    assert (tallest == 16) == (num_tokens * 8 / 128 <= 8)  # no padding-only row blocks
    assert tiles.table_for(128, 768, "NVIDIA_H200")[num_tokens] in found


def _fake_timer(calls):
    def time_config(num_tokens, config):
        calls.append(num_tokens)
        if config["num_stages"] == 5:
            raise RuntimeError("out of resources")  # skipped, not fatal
        # Fastest: the widest N at 3 stages, a deterministic pick to check.
        return 1.0 / config["BLOCK_SIZE_N"] + abs(config["num_stages"] - 3) + config["num_warps"]

    return time_config


def test_tune_picks_the_fastest_per_bucket_and_writes_a_table_the_loader_reads(tmp_path):
    calls, written = [], []
    shape = moe_tune.MoeShape(num_experts=8, hidden=64, inter=48, top_k=2)
    timer = _fake_timer(calls)

    def done(best):
        written.append(moe_tune.write_table(best, shape, "Fake_GPU", tmp_path))

    best = moe_tune.tune(shape, [1, 64], timer, done, log=lambda line: None)
    assert sorted(best) == [1, 64] and len(written) == 2  # written after each bucket
    for m, entry in best.items():
        assert entry["num_stages"] == 3 and entry["num_warps"] == 4
        assert entry["BLOCK_SIZE_N"] == max(
            c["BLOCK_SIZE_N"] for c in moe_tune.candidates(m, shape)
        )
    path = written[-1]
    assert path.name == "E=8,N=48,device_name=Fake_GPU.json"
    raw = json.loads(path.read_text())
    assert list(raw)[0] == "_comment" and "Fake_GPU" in raw["_comment"]
    assert tiles._load(path) == best  # the note is not an entry
    # A later run of one bucket keeps the others and says so.
    moe_tune.tune(shape, [64], timer, done, log=lambda line: None)
    raw = json.loads(written[-1].read_text())
    assert sorted(k for k in raw if k.isdigit()) == ["1", "64"] and "kept" in raw["_comment"]


def test_tune_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(moe_tune.torch.cuda, "is_available", lambda: False)
    assert kernels_triton.main(["--tune", "--tokens", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
