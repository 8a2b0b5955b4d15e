"""Grammars against the served tokenizer, the batched bitmask in the sampler, logit bias, and the
engine ending a request when its grammar completes."""

from __future__ import annotations

import json

import pytest
import torch

from services.language.engine.request import GenerationRequest, InvalidRequestError, SamplingParams
from services.language.engine.sampler import Sampler, build_sampling_batch
from services.language.engine.structured_output import GrammarCompiler, GrammarError
from services.language.engine.tokenizer import LanguageTokenizer
from tests.language.conftest import make_sequence
from tests.language.serving import SHAPES_VL

CHOICE = {"type": "or", "elements": [{"type": "const_string", "value": v} for v in ("red", "blue")]}


@pytest.fixture(scope="module")
def tokenizer() -> LanguageTokenizer:
    return LanguageTokenizer.from_model_dir(SHAPES_VL)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=448, cache_size=2)


def allowed(matcher, vocab: int = 448) -> set[int]:
    from xgrammar import allocate_token_bitmask

    mask = allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(mask)
    return {t for t in range(vocab) if (int(mask[0, t // 32]) >> (t % 32)) & 1}


def test_stop_tokens_are_the_eos_ids_and_special_tokens_never_match(compiler, tokenizer):
    assert tokenizer.eos_token_ids == (396, 394)  # <|im_end|>, <|endoftext|>
    matcher = compiler.compile(CHOICE).new_matcher()
    first = allowed(matcher)
    assert first and not first & set(range(394, 448))  # no special or padding id mid-grammar
    for token in tokenizer.encode("red"):
        assert matcher.accept_token(token)
    assert allowed(matcher) == {394, 396}  # complete: only the stop tokens
    assert matcher.accept_token(396) and matcher.is_terminated()


def test_cache_by_format_text_and_errors_name_the_problem(compiler):
    before = compiler.num_compiled
    a = compiler.compile({"type": "regex", "pattern": "[0-9]+"})
    assert compiler.compile({"type": "regex", "pattern": "[0-9]+"}) is a
    assert compiler.num_compiled == before + 1 and a.num_bytes > 0
    compiler.compile({"type": "regex", "pattern": "x"})
    compiler.compile({"type": "regex", "pattern": "y"})  # the cache holds 2: [0-9]+ goes
    assert compiler.compile({"type": "regex", "pattern": "[0-9]+"}) is not a
    with pytest.raises(GrammarError, match='Unsupported type "objectx"'):
        compiler.compile({"type": "json_schema", "json_schema": {"type": "objectx"}})
    with pytest.raises(GrammarError, match="parenthesis"):
        compiler.compile({"type": "regex", "pattern": "a(b"})
    with pytest.raises(GrammarError, match="not defined"):
        compiler.compile({"type": "grammar", "grammar": "root ::= missing"})


def test_json_is_compact_and_keeps_the_schema_order(compiler):
    schema = {
        "type": "object",
        "properties": {"b": {"type": "integer"}, "a": {"enum": ["x"]}},
        "required": ["b", "a"],
    }
    grammar = compiler.compile({"type": "json_schema", "json_schema": schema})
    assert grammar.new_matcher().accept_string('{"b": 1, "a": "x"}')
    assert not grammar.new_matcher().accept_string('{"a": "x", "b": 1}')
    assert not grammar.new_matcher().accept_string('{ "b": 1, "a": "x"}')


def _grammar_seq(compiler, request_id: str, fmt=CHOICE, **sampling):
    seq = make_sequence([1, 2, 3], request_id=request_id, **sampling)
    seq.grammar = compiler.compile(fmt).new_matcher()
    return seq


def test_mask_applies_to_grammar_rows_only_in_a_mixed_batch(compiler, tokenizer):
    torch.manual_seed(0)
    logits = torch.randn(3, 448)
    seqs = [
        make_sequence([1, 2, 3], request_id="free", temperature=0.0),
        _grammar_seq(compiler, "g1", temperature=0.0),
        _grammar_seq(compiler, "g2", temperature=1.0, seed=3),
    ]
    seqs[2].generator = torch.Generator().manual_seed(3)
    batch = build_sampling_batch(seqs, 448, "cpu")
    assert batch.grammar_rows == (1, 2)
    original = logits.clone()
    out = Sampler()(logits, batch)
    assert torch.equal(logits, original)  # the executor's logits are not modified
    assert out.token_ids[0] == int(original[0].argmax())
    for token in out.token_ids[1:]:  # any tokenization of a choice may start it
        text = tokenizer.decode([token])
        assert text and ("red".startswith(text) or "blue".startswith(text)), text


def test_logit_bias_is_batched_and_validated():
    logits = torch.zeros(2, 448)
    seqs = [
        make_sequence([1], request_id="a", temperature=0.0, logit_bias=((7, 5.0), (9, 8.0))),
        make_sequence([1], request_id="b", temperature=0.0, logprobs=1, logit_bias=((11, 100.0),)),
    ]
    out = Sampler()(logits, build_sampling_batch(seqs, 448, "cpu"))
    assert out.token_ids == [9, 11]
    assert out.logprobs[1].logprob == pytest.approx(0.0, abs=1e-6)  # of the biased softmax
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias=((1, 101.0),))


def test_engine_ends_a_request_when_its_grammar_completes(compiler, tokenizer):
    """Greedy on the shapes model, ignore_eos on: the grammar still ends it with "stop"."""
    from services.language.engine import EngineConfig
    from services.language.engine.build import build_engine_core

    core = build_engine_core(SHAPES_VL, EngineConfig(kv_cache_memory=16 * 2**20, max_model_len=512))
    prompt = tuple(
        tokenizer.encode("<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n")
    )
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = compiler.compile({"type": "json_schema", "json_schema": schema})
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for rid in ("x", "y"):  # one matcher each, in one batch
        core.add_request(GenerationRequest(rid, prompt, (), params, 0.0, grammar))
    tokens: dict[str, list[int]] = {"x": [], "y": []}
    reasons = {}
    while core.has_work():
        for output in core.step():
            tokens[output.request_id] += output.new_token_ids
            if output.finished:
                reasons[output.request_id] = output.finish_reason
    assert reasons == {"x": "stop", "y": "stop"}
    for ids in tokens.values():
        assert ids[-1] in tokenizer.eos_token_ids
        assert json.loads(tokenizer.decode(ids)) in ({"ok": True}, {"ok": False})


def test_reasoning_comes_before_the_grammar(compiler):
    from services.language.parsers.reasoning import reasoning_format

    opened = compiler.compile(reasoning_format(CHOICE, prompt_open=True))
    matcher = opened.new_matcher()
    assert matcher.accept_string("The circle looks red.</think>\n\nred") and matcher.is_completed()
    unfinished = opened.new_matcher()
    assert unfinished.accept_string("red") and not unfinished.is_completed()  # still thinking
    optional = compiler.compile(reasoning_format(CHOICE, prompt_open=False))
    assert optional.new_matcher().accept_string("blue")
    assert optional.new_matcher().accept_string("<think>hmm</think>\n\nred")


@pytest.mark.gpu
def test_bitmask_on_cuda_equals_cpu(compiler):
    from services.language.engine.structured_output import TokenBitmask

    torch.manual_seed(0)
    logits = torch.randn(4, 448)
    matchers = [compiler.compile(CHOICE).new_matcher() for _ in range(2)]
    on_cpu, on_gpu = logits.clone(), logits.cuda()
    TokenBitmask().apply(on_cpu, (1, 3), matchers)
    TokenBitmask().apply(on_gpu, (1, 3), matchers)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(on_cpu[[0, 2]], logits[[0, 2]]) and torch.isinf(on_cpu[1]).any()
    seqs = [_grammar_seq(compiler, str(i), temperature=0.0) for i in range(3)]
    batch = build_sampling_batch(seqs, 448, "cuda")
    assert (
        Sampler()(logits.cuda(), batch).token_ids
        == Sampler()(logits, build_sampling_batch(seqs, 448, "cpu")).token_ids
    )
