"""Sampling through the engine: top_k=1, seeds, stop strings and logprobs against the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.language.engine import EngineConfig
from services.language.engine.request import SamplingParams
from tests.language.conftest import (
    greedy_request,
    hf_output_logits,
    make_prompt_case,
    run_engine,
)

CONFIG = EngineConfig(kv_cache_memory=1 << 22, block_size=4)


@pytest.fixture(scope="module")
def cases(tiny_vision):
    specs = [([9], []), ([4, 6], [(64, 96)]), ([3, 5, 2], [(64, 96), (96, 64)])]
    return [
        make_prompt_case(tiny_vision, runs, sizes, seed=40 + i)
        for i, (runs, sizes) in enumerate(specs)
    ]


def _with(request, rid, **params):
    sampling = dataclasses.replace(request.sampling, **params)
    return dataclasses.replace(request, request_id=rid, sampling=sampling)


def test_top_k_1_equals_greedy(cases, tiny_vl_model_dir):
    greedy = [greedy_request(f"g{i}", c, 10) for i, c in enumerate(cases)]
    top1 = [_with(r, f"k{i}", temperature=1.5, top_k=1, seed=None) for i, r in enumerate(greedy)]
    tokens, _, _ = run_engine(tiny_vl_model_dir, CONFIG, greedy + top1)
    for i in range(len(cases)):
        assert tokens[f"k{i}"] == tokens[f"g{i}"]


def test_seeded_request_reproduces_alone_and_in_a_batch(cases, tiny_vl_model_dir):
    base = greedy_request("s", cases[1], 12)
    seeded = _with(base, "seeded", temperature=1.0, seed=1234)
    alone, _, _ = run_engine(tiny_vl_model_dir, CONFIG, [seeded])
    others = [
        _with(greedy_request(f"o{i}", c, 12), f"o{i}", temperature=1.0) for i, c in enumerate(cases)
    ]
    batched, _, _ = run_engine(tiny_vl_model_dir, CONFIG, [others[0], seeded, *others[1:]])
    assert batched["seeded"] == alone["seeded"]
    reseeded, _, _ = run_engine(tiny_vl_model_dir, CONFIG, [_with(seeded, "seeded", seed=99)])
    assert reseeded["seeded"] != alone["seeded"]


def test_stop_string_across_tokens_cuts_the_text(cases, tiny_vl_model_dir):
    request = greedy_request("full", cases[0], 24)
    _, full_outputs, _ = run_engine(tiny_vl_model_dir, CONFIG, [request])
    text = "".join(o.new_text for o in full_outputs["full"])
    # Pick two printable characters after the start: with the byte-level tokenizer they are
    # two tokens, so the stop string spans a token boundary.
    start = next(
        i
        for i in range(2, len(text) - 1)
        if text[i : i + 2].isprintable()
        and "\ufffd" not in text[i : i + 2]
        and text.find(text[i : i + 2]) == i
    )
    stop = text[start : start + 2]
    _, outputs, stats = run_engine(tiny_vl_model_dir, CONFIG, [_with(request, "cut", stop=(stop,))])
    streamed = [o.new_text for o in outputs["cut"]]
    assert "".join(streamed) == text[:start]
    assert outputs["cut"][-1].finish_reason == "stop"
    assert outputs["cut"][-1].num_output_tokens < 24
    assert stats.num_free_blocks == stats.num_total_blocks


def test_stop_token_ids_and_eos(cases, tiny_vl_model_dir):
    request = greedy_request("full", cases[0], 12)
    tokens, _, _ = run_engine(tiny_vl_model_dir, CONFIG, [request])
    target = tokens["full"][5]
    stopped, outputs, _ = run_engine(
        tiny_vl_model_dir, CONFIG, [_with(request, "stop", stop_token_ids=(target,))]
    )
    cut = tokens["full"].index(target) + 1
    assert stopped["stop"] == tokens["full"][:cut]
    assert outputs["stop"][-1].finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_the_model_logits(cases, tiny_vl_hf, tiny_vl_model_dir):
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=6, logprobs=4)
    requests = [
        dataclasses.replace(greedy_request(f"l{i}", c, 6), sampling=params)
        for i, c in enumerate(cases)
    ]
    tokens, outputs, _ = run_engine(tiny_vl_model_dir, CONFIG, requests)
    for i, case in enumerate(cases):
        logprobs = [lp for o in outputs[f"l{i}"] for lp in o.logprobs]
        assert [lp.token_id for lp in logprobs] == tokens[f"l{i}"]
        reference = torch.log_softmax(hf_output_logits(tiny_vl_hf, case, tokens[f"l{i}"]), -1)
        for step, lp in enumerate(logprobs):
            assert lp.logprob == pytest.approx(reference[step, lp.token_id].item(), abs=1e-4)
            top_ids = [t for t, _ in lp.top]
            assert len(top_ids) == 4
            assert top_ids[0] == int(reference[step].argmax())
            for token_id, value in lp.top:
                assert value == pytest.approx(reference[step, token_id].item(), abs=1e-4)
