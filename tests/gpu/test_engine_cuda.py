"""The engine on CUDA (run on a GPU machine: `pytest -m gpu tests/gpu`): captured decode graphs
replay what eager runs compute for every capture size, with no host sync inside; bf16 greedy
answers of the trained small model equal transformers'; two ranks on two GPUs equal one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from services.language.engine import EngineConfig
from services.language.engine.build import build_engine_core
from services.language.engine.request import GenerationRequest, SamplingParams
from shared.model.loader import load_vision_model
from shared.model.processing import load_image_processor_config, preprocess_image
from shared.wire.images import EncodedImage
from tests.tiny import make_vl_checkpoint

pytestmark = pytest.mark.gpu
SHAPES_VL = Path(__file__).resolve().parents[2] / "models" / "shapes-vl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from scripts.testkit.tokenizers import save_tokenizer
    from tests.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB

    path = tmp_path_factory.mktemp("tiny_cuda")
    make_vl_checkpoint(path, seed=0)
    special = {
        "<|image_pad|>": IMAGE_TOKEN_ID,
        "<|video_pad|>": VIDEO_TOKEN_ID,
        "<|vision_start|>": VISION_START_ID,
        "<|vision_end|>": VISION_END_ID,
    }
    save_tokenizer(path, "{{ messages }}", special, vocab_size=VOCAB)
    return path


def _decode_ready_core(model_dir, num_requests: int, **overrides):
    config = EngineConfig(
        device="cuda", max_num_seqs=16, kv_cache_memory=64 << 20, max_model_len=256, **overrides
    )
    core = build_engine_core(model_dir, config)
    gen = torch.Generator().manual_seed(0)
    for i in range(num_requests):
        ids = tuple(torch.randint(0, 290, (20 + 3 * i,), generator=gen).tolist())
        sampling = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        core.add_request(GenerationRequest(f"r{i}", ids, (), sampling, 0.0))
    while core.scheduler.num_waiting or any(
        s.num_output_tokens == 0 for s in core.scheduler.running
    ):
        core.step()
    return core


@pytest.mark.parametrize("num_requests", [1, 2, 3, 5, 8, 11, 16])
def test_graph_replay_equals_eager_without_host_syncs(tiny_dir, num_requests):
    core = _decode_ready_core(tiny_dir, num_requests)
    runner = core.executor.runner
    assert runner.graphs is not None
    scheduled = core.scheduler.schedule()
    runner.state.update(scheduled.plan)
    batch = runner.prepare(scheduled.plan)
    assert batch.graph_size == runner.config.padded(num_requests)
    eager = runner.forward(dataclasses.replace(batch, graph_size=None)).clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = runner.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(replayed[:num_requests], eager[:num_requests], rtol=0, atol=0)


def test_graphs_and_eager_generate_the_same_tokens(tiny_dir):
    outs = []
    for eager in (False, True):
        core = _decode_ready_core(tiny_dir, 6, enforce_eager=eager)
        tokens = {}
        while core.has_work():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        outs.append(tokens)
    assert outs[0] == outs[1]


def _shapes_requests(num: int):
    """Held-out shapes questions: prompt ids (pads expanded) and pixel values per request."""
    from transformers import PreTrainedTokenizerFast

    from scripts.shapes_vl.data import make_dataset
    from scripts.shapes_vl.evaluate import HELD_OUT_SEED

    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHAPES_VL)
    processor = load_image_processor_config(SHAPES_VL)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    cases = []
    for example in make_dataset(HELD_OUT_SEED, num):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": example.question}],
            }
        ]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        pixels, grid = preprocess_image(example.image.convert("RGB"), processor)
        n = grid[0] * grid[1] * grid[2] // processor.merge_size**2
        expanded = [t for token in ids for t in ([token] * n if token == pad else [token])]
        cases.append((expanded, pixels, grid))
    return cases, pad


def test_bf16_greedy_answers_equal_transformers():
    from transformers import Qwen3VLMoeForConditionalGeneration

    cases, pad = _shapes_requests(6)
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(SHAPES_VL, dtype=torch.bfloat16)
    hf = hf.to("cuda").eval()
    vision = load_vision_model(SHAPES_VL, dtype=torch.bfloat16, device="cuda")
    core = build_engine_core(
        SHAPES_VL,
        EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory=64 << 20, max_model_len=1024),
    )
    expected = {}
    for i, (ids, pixels, grid) in enumerate(cases):
        with torch.inference_mode():
            packed = vision(pixels.to("cuda", torch.bfloat16), torch.tensor([grid]))
            prompt = torch.tensor([ids], device="cuda")
            out = hf.generate(
                input_ids=prompt,
                pixel_values=pixels.to("cuda", torch.bfloat16),
                image_grid_thw=torch.tensor([grid], device="cuda"),
                mm_token_type_ids=(prompt == pad).int(),
                max_new_tokens=16,
                do_sample=False,
            )
        expected[f"q{i}"] = out[0, len(ids) :].tolist()
        image = EncodedImage(packed, tuple(grid), f"{i:064x}")
        sampling = SamplingParams(temperature=0.0, max_tokens=16)
        core.add_request(GenerationRequest(f"q{i}", tuple(ids), (image,), sampling, 0.0))
    got: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    eos = set(core.tokenizer.eos_token_ids)
    for rid, tokens in expected.items():
        trimmed = tokens[: next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))]
        assert got[rid] == trimmed, rid


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)
def test_two_ranks_on_two_gpus_equal_one(tiny_dir):
    results = []
    for tp in (1, 2):
        core = build_engine_core(
            tiny_dir,
            EngineConfig(
                device="cuda", tensor_parallel_size=tp, kv_cache_memory=64 << 20, max_model_len=256
            ),
        )
        gen = torch.Generator().manual_seed(1)
        for i in range(4):
            ids = tuple(torch.randint(0, 290, (17 + i,), generator=gen).tolist())
            sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            core.add_request(GenerationRequest(f"r{i}", ids, (), sampling, 0.0))
        tokens: dict[str, list[int]] = {}
        while core.has_work():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        core.executor.shutdown()
        results.append(tokens)
    assert results[0] == results[1]
