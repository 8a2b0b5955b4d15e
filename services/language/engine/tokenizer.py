"""The language tokenizer and incremental detokenization with stop strings.

Streaming text token by token has two traps: a token may hold only part of a UTF-8 character
(byte-level BPE), and a stop string may span several tokens. The detokenizer decodes a short
sliding window of ids and only releases text once the window no longer ends in a replacement
character; it holds back the last ``len(longest stop) - 1`` characters until it knows they do
not start a stop string, so a stop string is never partly streamed.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

# Prompt tokens decoded ahead of the output so tokenizers whose pieces depend on their left
# neighbour (leading-space rules) render the first output token as in the full text.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class TokenizerLoadError(ValueError):
    """The model directory has no usable tokenizer.json."""


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class LanguageTokenizer:
    """A ``tokenizers.Tokenizer`` plus the end-of-sequence ids the engine stops on."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LanguageTokenizer:
        """Load tokenizer.json; EOS ids from tokenizer_config.json and generation_config.json."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerLoadError(f"{path} not found: the model directory needs tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
        eos: list[int] = []
        eos_token = _token_content(_read_json(model_dir / "tokenizer_config.json").get("eos_token"))
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos.append(tokenizer.token_to_id(eos_token))
        eos += _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        return cls(tokenizer, tuple(dict.fromkeys(eos)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, cutting at the first stop string."""

    def __init__(
        self,
        tokenizer: LanguageTokenizer,
        prompt_token_ids: tuple[int, ...] | list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far, cut at a stop string
        self._num_emitted = 0
        self.stopped_by: str | None = None

    def add_token(self, token_id: int) -> bool:
        """Append one token; returns True when the text now contains a stop string."""
        if self.stopped_by is not None:
            return True
        self._ids.append(token_id)
        new_text = self._decode_step()
        if not new_text:
            return False
        search_from = max(0, len(self.text) - self._hold_back)
        self.text += new_text
        hits = [(i, stop) for stop in self._stop if (i := self.text.find(stop, search_from)) >= 0]
        if hits:
            index, self.stopped_by = min(hits)
            self.text = self.text[:index]  # the stop string itself is never emitted
        return self.stopped_by is not None

    def _decode_step(self) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
        full = decode(self._ids[self._prefix_offset :], self._skip_special)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 character (or nothing visible) so far
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> None:
        """At the end of the stream, release bytes still waiting for a character to complete."""
        if self.stopped_by is None and self._read_offset < len(self._ids):
            decode = self._tokenizer.decode
            prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
            full = decode(self._ids[self._prefix_offset :], self._skip_special)
            self.text += full[len(prefix) :]
            self._read_offset = len(self._ids)

    def pop_new_text(self, finished: bool) -> str:
        """Text not yet returned; while running, the tail that may start a stop string stays."""
        end = len(self.text)
        if not finished:
            end = max(self._num_emitted, end - self._hold_back)
        new_text = self.text[self._num_emitted : end]
        self._num_emitted = end
        return new_text
