"""Training/evaluation sequences equal the chat template's rendering, with loss on answers only."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from scripts.shapes_vl.data import make_dataset
from scripts.shapes_vl.prompts import (
    IGNORE_INDEX,
    conversation_ids,
    make_batch,
    make_conversation_batch,
)
from tests.shapes_vl.conftest import SHIPPED


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))


@pytest.fixture(scope="module")
def image_processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(SHIPPED)


def _rendered_ids(tokenizer: Tokenizer, messages: list[dict], num_image_tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(SHIPPED)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens)
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_two_turn_conversation_matches_chat_template(tokenizer):
    turns = [("How many shapes are there?", "two"), ("What color is the circle?", "red")]
    ids, labels = conversation_ids(tokenizer, turns, num_image_tokens=9)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]},
        {"role": "assistant", "content": turns[0][1]},
        {"role": "user", "content": turns[1][0]},
        {"role": "assistant", "content": turns[1][1]},
    ]
    rendered = _rendered_ids(tokenizer, messages, 9)
    # The template closes every assistant turn with "<|im_end|>\n"; generation stops at <|im_end|>.
    assert rendered[:-1] == ids and tokenizer.decode(rendered[-1:]) == "\n"
    answer_tokens = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert (
        tokenizer.decode(answer_tokens, skip_special_tokens=False) == "two<|im_end|>red<|im_end|>"
    )


def test_batch_pads_right_and_marks_image_tokens(tokenizer, image_processor):
    examples = make_dataset(8, 4)
    batch = make_batch(
        tokenizer,
        image_processor,
        [e.image for e in examples],
        [e.question for e in examples],
        [e.answer for e in examples],
    )
    pad = tokenizer.token_to_id("<|image_pad|>")
    merge = image_processor.merge_size
    for row, ex in enumerate(examples):
        n = int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        tokens = int(batch.image_grid_thw[row].prod()) // merge**2
        assert int((batch.input_ids[row] == pad).sum()) == tokens
        assert batch.mm_token_type_ids[row].tolist() == (batch.input_ids[row] == pad).int().tolist()
        answer = [t for t in batch.labels[row].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(answer, skip_special_tokens=False) == ex.answer + "<|im_end|>"
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(dim=1).sum())


def test_prompt_only_batch_has_no_labels(tokenizer, image_processor):
    examples = make_dataset(9, 2)
    batch = make_batch(
        tokenizer, image_processor, [e.image for e in examples], [e.question for e in examples]
    )
    assert (batch.labels == IGNORE_INDEX).all()


def test_mismatched_lengths_raise(tokenizer, image_processor):
    examples = make_dataset(9, 2)
    with pytest.raises(ValueError, match="2 images for 1 conversations"):
        make_conversation_batch(
            tokenizer,
            image_processor,
            [e.image for e in examples],
            [[("How many shapes are there?", None)]],
        )
