"""Incremental detokenization: no broken UTF-8, stop strings across token boundaries."""

from __future__ import annotations

import json

import pytest

from scripts.testkit.tokenizers import build_tokenizer, save_tokenizer
from services.language.engine.tokenizer import (
    IncrementalDetokenizer,
    LanguageTokenizer,
    TokenizerLoadError,
)


@pytest.fixture(scope="module")
def tok() -> LanguageTokenizer:
    # Byte-level with no merges: every byte is a token, so one character can span four tokens.
    return LanguageTokenizer(build_tokenizer(), eos_token_ids=())


def _stream(tok, text, stop=(), prompt="hi"):
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), stop)
    deltas, stopped = [], False
    for token_id in tok.encode(text):
        stopped = detok.add_token(token_id)
        if stopped:
            break
        deltas.append(detok.pop_new_text(finished=False))
    detok.flush()
    deltas.append(detok.pop_new_text(finished=True))
    return deltas, stopped, detok


def test_multibyte_characters_are_never_split():
    text = "héllo wörld 你好 🙂!"
    deltas, stopped, _ = _stream(tok=LanguageTokenizer(build_tokenizer(), ()), text=text)
    assert not stopped
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "好" in deltas  # released whole, once its third byte arrived


def test_stop_string_spanning_tokens_is_cut_and_not_emitted(tok):
    deltas, stopped, detok = _stream(tok, "abc STOP def", stop=("STOP",))
    assert stopped and detok.stopped_by == "STOP"
    assert "".join(deltas) == "abc "
    assert all("S" not in d for d in deltas)  # no partial stop string was ever streamed


def test_earliest_stop_string_wins(tok):
    deltas, stopped, detok = _stream(tok, "one two three", stop=("three", "two"))
    assert stopped and detok.stopped_by == "two" and "".join(deltas) == "one "


def test_held_back_prefix_is_released_when_no_stop_follows(tok):
    deltas, stopped, _ = _stream(tok, "abxyq", stop=("xyz",))
    assert not stopped and "".join(deltas) == "abxyq"
    assert deltas[:3] == ["", "", "a"]  # two characters held back while they might start "xyz"


def test_stop_string_inside_a_multibyte_run(tok):
    deltas, stopped, _ = _stream(tok, "日本語です", stop=("語",))
    assert stopped and "".join(deltas) == "日本"


def test_loads_eos_ids_from_model_dir(tmp_path):
    save_tokenizer(tmp_path, "{{ messages }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    loaded = LanguageTokenizer.from_model_dir(tmp_path)
    im_end = loaded.token_to_id("<|im_end|>")
    assert loaded.eos_token_ids == (im_end, 7, 3)
    assert loaded.decode(loaded.encode("hé <|im_end|>")) == "hé "


def test_missing_tokenizer_json_is_a_typed_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        LanguageTokenizer.from_model_dir(tmp_path)
