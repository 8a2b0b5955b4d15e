"""Tensor and expert parallelism over an FP8 checkpoint: two gloo processes give the single
process's logits, each reading only its slices of the e4m3 weights and of their block scales."""

from __future__ import annotations

import pytest
import torch

from scripts.quantize_fp8 import quantize_checkpoint
from shared.model.checkpoint import (
    CheckpointError,
    PerExpertGateUpSource,
    Reader,
    Shard,
    checkpoint_files,
)
from shared.model.loader import load_text_model
from tests.model.test_fp8_checkpoint import FP8_TEXT, VISION
from tests.model.test_tp import IDS, _run, _tensor_bytes
from tests.tiny import make_vl_checkpoint


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    source = tmp_path_factory.mktemp("fp8-tp-source")
    make_vl_checkpoint(source, seed=6, text=FP8_TEXT, vision=VISION, mrope=(24, 20, 20))
    return quantize_checkpoint(source, tmp_path_factory.mktemp("fp8-tp"))


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_two_ranks_match_one_reading_half_the_experts_and_scales(tmp_path, fp8_dir, ep):
    ranks = _run(tmp_path, fp8_dir, 2, ep)
    with torch.no_grad():
        want = load_text_model(fp8_dir)(IDS)
    sizes = _tensor_bytes(fp8_dir)
    experts = {k: v for k, v in sizes.items() if ".experts." in k}
    scales = [k for k in experts if k.endswith("weight_scale_inv")]
    assert scales
    for rank in ranks:
        assert (rank["logits"] - want).abs().max().item() < 1e-5
        read = rank["bytes_read"]
        for kind in (scales, [k for k in experts if k not in scales]):
            # tp: half of every expert tensor; ep: the whole of half the experts
            assert sum(read.get(k, 0) for k in kind) * 2 == sum(experts[k] for k in kind)


def test_a_slice_inside_a_scale_block_is_refused(fp8_dir):
    """Four ranks would split each expert's 256 intermediate rows in 64s: half a scale block."""
    base = "model.language_model.layers.0.mlp.experts"
    source = PerExpertGateUpSource(base, FP8_TEXT["num_experts"], 256, scales=True)
    reader = Reader(checkpoint_files(fp8_dir))
    with pytest.raises(CheckpointError, match="expert-parallel"):
        source.load(reader, Shard(2, ((64, 128), (256 + 64, 256 + 128))))
    whole_blocks = source.load(reader, Shard(2, ((128, 256), (384, 512))))
    assert whole_blocks.shape == (FP8_TEXT["num_experts"], 1, 2)
