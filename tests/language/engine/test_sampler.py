"""Batched sampling: greedy, top-k/top-p/min-p, penalties, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch

from services.language.engine.request import InvalidRequestError, SamplingParams, choice_seed
from services.language.engine.sampler import Sampler, apply_penalties, build_sampling_batch
from tests.language.conftest import make_sequence

V = 32


def _seqs(*params: dict, prompt=(1, 2, 3)):
    seqs = []
    for i, p in enumerate(params):
        seq = make_sequence(list(prompt), request_id=str(i), **p)
        if seq.sampling.seed is not None:
            seq.generator = torch.Generator().manual_seed(seq.sampling.seed)
        seqs.append(seq)
    return seqs


def _sample(logits, seqs):
    return Sampler()(logits, build_sampling_batch(seqs, logits.shape[1], "cpu"))


def test_invalid_parameters_raise_typed_errors():
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="stop"):
        SamplingParams(stop=("",))
    for bad in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**31}, {"max_tokens": 2**31}):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(2**31,))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias=((2**31, 1.0),))


def test_choice_seeds_stay_in_the_range_manual_seed_takes():
    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(2**64 - 1, 1) == 0  # wraps instead of overflowing
    assert choice_seed(-1, 0) == -1 and choice_seed(-1, 1) == 0  # -1 is 2**64 - 1 to torch
    for seed in (-(2**63), 2**64 - 1):
        for index in range(3):
            torch.Generator().manual_seed(choice_seed(seed, index))  # no overflow


def test_greedy_and_top_k_1_pick_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    seqs = _seqs(*[{"temperature": 0.0}] * 3, *[{"temperature": 1.3, "top_k": 1}] * 3)
    out = _sample(logits, seqs)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_a_top_k_above_the_vocabulary_is_no_top_k():
    torch.manual_seed(3)
    logits = torch.randn(2, V)
    wide = _seqs({"seed": 5, "top_k": 2**31 - 1}, {"seed": 5, "top_k": 0})
    assert len(set(_sample(logits[:1].repeat(2, 1), wide).token_ids)) == 1


def test_seeded_request_reproduces_alone_and_in_any_batch():
    torch.manual_seed(1)
    steps = [torch.randn(3, V) for _ in range(5)]
    alone = _seqs({"seed": 7, "temperature": 1.0})
    batched = _seqs({"temperature": 1.0}, {"seed": 7, "temperature": 1.0}, {"seed": 8})
    tokens_alone = [_sample(s[1:2], alone).token_ids[0] for s in steps]
    tokens_batched = [_sample(s, batched).token_ids[1] for s in steps]
    assert tokens_alone == tokens_batched
    other_seed = _seqs({"seed": 8, "temperature": 1.0})
    assert [_sample(s[1:2], other_seed).token_ids[0] for s in steps] != tokens_alone


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seqs = _seqs(*[{"temperature": 0.7}] * 4000)
    torch.manual_seed(2)
    counts = torch.bincount(torch.tensor(_sample(logits, seqs).token_ids), minlength=4)
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.03)


def test_top_p_and_min_p_restrict_the_candidates():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(600, 1)
    torch.manual_seed(3)
    top_p = set(_sample(logits, _seqs(*[{"top_p": 0.75}] * 600)).token_ids)
    assert top_p == {0, 1}
    min_p = set(_sample(logits, _seqs(*[{"min_p": 0.5}] * 600)).token_ids)
    assert min_p == {0, 1}
    top_k = set(_sample(logits, _seqs(*[{"top_k": 3}] * 600)).token_ids)
    assert top_k == {0, 1, 2}


def test_penalties_follow_hf_and_openai_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 1.0]])
    seq = _seqs(
        {"repetition_penalty": 2.0, "presence_penalty": 0.5, "frequency_penalty": 0.25},
        prompt=(0, 1),
    )[0]
    seq.token_ids += [2, 2]  # output token 2 twice
    batch = build_sampling_batch([seq], 5, "cpu")
    out = apply_penalties(logits, batch)
    # 0, 1 (prompt): repetition only; 2 (output x2): repetition, presence, 2 x frequency.
    expected = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 1.0, 1.0]])
    assert torch.allclose(out, expected)


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seq = _seqs({"temperature": 0.0, "frequency_penalty": 1.0}, prompt=(2,))[0]
    seq.token_ids.append(0)
    assert _sample(logits, [seq]).token_ids == [1]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    torch.manual_seed(4)
    logits = torch.randn(3, V) * 3
    seqs = _seqs(
        {"temperature": 0.0, "logprobs": 3, "repetition_penalty": 1.5}, {"logprobs": 0}, {}
    )
    out = _sample(logits, seqs)
    reference = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert first.logprob == pytest.approx(reference[0, first.token_id].item(), abs=1e-6)
    values, ids = reference[0].topk(3)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    second = out.logprobs[1]
    assert second.top == ()
    assert second.logprob == pytest.approx(reference[1, second.token_id].item(), abs=1e-6)
    assert out.logprobs[2] is None
