"""The shapes tokenizer: exact round trips, special tokens by name, and the chat format."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from scripts.shapes_vl.data import COLORS, COUNT_WORDS, SHAPES, make_dataset
from scripts.shapes_vl.prompts import answer_ids, prompt_ids
from scripts.shapes_vl.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
    save_tokenizer,
    special_token_ids,
)
from tests.shapes_vl.conftest import SHIPPED

TEMPLATE = SHIPPED / "chat_template.jinja"


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    corpus = make_dataset(11, 400)
    return build_tokenizer([t for ex in corpus for t in (ex.question, ex.answer)], 320)


@pytest.fixture(scope="module")
def shipped_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))


def test_round_trip_on_task_and_arbitrary_text(small_tokenizer):
    texts = [t for ex in make_dataset(12, 100) for t in (ex.question, ex.answer)]
    texts += ["  two  spaces", "tab\tand\nnewline", "ünïcödé ✓ 123", "A red circle."]
    for text in texts:
        assert small_tokenizer.decode(small_tokenizer.encode(text).ids) == text


def test_specials_are_single_tokens_after_the_learned_vocab(small_tokenizer):
    ids = special_token_ids(small_tokenizer)
    assert list(ids) == list(SPECIAL_TOKENS)
    learned = small_tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    assert 256 < learned <= 320
    assert list(ids.values()) == list(range(learned, learned + len(SPECIAL_TOKENS)))
    for name, token_id in ids.items():
        assert small_tokenizer.encode(name).ids == [token_id]


def test_answer_words_are_whole_tokens(shipped_tokenizer):
    # An answer's first token carries the whole decision; split words would spread it out.
    words = [*COLORS, *SHAPES, *COUNT_WORDS[1:], "left", "right", "top", "bottom"]
    for word in words + [f" {w}" for w in [*COLORS, *SHAPES]]:
        assert len(shipped_tokenizer.encode(word).ids) == 1, word


def test_shipped_tokenizer_round_trips_held_out_answers(shipped_tokenizer):
    for ex in make_dataset(99, 100):
        for text in (ex.question, ex.answer):
            assert shipped_tokenizer.decode(shipped_tokenizer.encode(text).ids) == text


def test_shipped_special_ids_match_config(shipped_tokenizer, shipped_config):
    ids = special_token_ids(shipped_tokenizer)
    assert shipped_config["image_token_id"] == ids["<|image_pad|>"]
    assert shipped_config["video_token_id"] == ids["<|video_pad|>"]
    assert shipped_config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert shipped_config["vision_end_token_id"] == ids["<|vision_end|>"]
    assert shipped_config["text_config"]["vocab_size"] >= shipped_tokenizer.get_vocab_size()
    tok_cfg = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == EOS_TOKEN and tok_cfg["pad_token"] == PAD_TOKEN
    assert tok_cfg["chat_template"] == TEMPLATE.read_text()


def test_transformers_tokenizer_matches_and_renders_the_prompt(shipped_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(SHIPPED)
    assert hf.eos_token == EOS_TOKEN and hf.pad_token == PAD_TOKEN
    question = "What colour is the circle?"
    assert hf.encode(question, add_special_tokens=False) == shipped_tokenizer.encode(question).ids
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected
    pad = shipped_tokenizer.token_to_id("<|image_pad|>")
    ids = hf.encode(rendered, add_special_tokens=False)
    at = ids.index(pad)
    assert ids[:at] + [pad] * 12 + ids[at + 1 :] == prompt_ids(shipped_tokenizer, question, 12)


def test_answer_ends_with_im_end(shipped_tokenizer):
    ids = answer_ids(shipped_tokenizer, "A blue square.")
    assert ids[-1] == shipped_tokenizer.token_to_id(EOS_TOKEN)
    assert shipped_tokenizer.decode(ids[:-1]) == "A blue square."


def test_save_writes_loadable_files(small_tokenizer, tmp_path):
    save_tokenizer(small_tokenizer, tmp_path, TEMPLATE.read_text())
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.encode("A red circle.").ids == small_tokenizer.encode("A red circle.").ids
    assert (tmp_path / "chat_template.jinja").read_text() == TEMPLATE.read_text()
