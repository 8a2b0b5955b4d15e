"""Structured outputs with xgrammar: grammars compiled against the served tokenizer, one matcher
per request, and the batched token bitmask the sampler applies.

Every constraint (JSON schema, regex, choice, EBNF grammar, forced tool calls, a reasoning block
before them) is described as an xgrammar structural-tag format (plain JSON), so one compile path
and one LRU cache serve them all, keyed by the format's JSON text (key order kept: a schema's
property order is the order the output follows). JSON is generated compact (`", "` and `": "`
separators, no other whitespace): free whitespace lets a weak model pad forever. xgrammar is
imported on first use; a server that never sees a structured request never pays for it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.language.engine.tokenizer import LanguageTokenizer

# xgrammar prefixes C++ errors with "[hh:mm:ss] /path/file.cc:123: "; users need the rest
_CPP_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message says what is wrong with it."""


@dataclass(frozen=True)
class Constraint:
    """A structural-tag format a request's output must follow, and the request field it came
    from (named in errors)."""

    format: dict[str, Any]
    param: str


def _xgrammar():
    import xgrammar

    return xgrammar


def build_tokenizer_info(tokenizer: LanguageTokenizer, vocab_size: int) -> Any:
    """xgrammar's view of the served vocabulary, `vocab_size` rows wide (the model's logits).

    Special added tokens (`<|im_start|>`, `<|image_pad|>`, ...) are given empty text, which
    xgrammar never allows inside a grammar: the detokenizer drops them from the output, so a
    JSON string built from one would not read back as generated. The stop tokens are the
    engine's EOS ids (`<|im_end|>`, `<|endoftext|>` for Qwen), so a finished grammar ends the
    request the way the model itself would.
    """
    xgr = _xgrammar()
    from xgrammar.tokenizer_info import TokenizerInfo

    backend = tokenizer.tokenizer
    encoded = [""] * vocab_size
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if index < vocab_size:
            encoded[index] = token
    for index, added in backend.get_added_tokens_decoder().items():
        if added.special and index < vocab_size:
            encoded[index] = ""
    metadata = TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    stop_ids = [t for t in tokenizer.eos_token_ids if t < vocab_size]
    if not stop_ids:
        raise GrammarError("the tokenizer has no end-of-sequence token to end a grammar with")
    return xgr.TokenizerInfo(
        encoded,
        metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=stop_ids,
        add_prefix_space=metadata["add_prefix_space"],
    )


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled constraint; immutable and shared by every request that uses it."""

    compiled: Any  # xgrammar.CompiledGrammar
    key: str  # the format's JSON text
    num_bytes: int = 0  # its memory, for the cache's budget

    def new_matcher(self) -> Any:
        """A fresh xgrammar GrammarMatcher at the start of the grammar."""
        return _xgrammar().GrammarMatcher(self.compiled)


def _lower(fmt: Any, xgr: Any) -> Any:
    """The format with every `json_schema` element replaced by the EBNF of its compact JSON."""
    if isinstance(fmt, list):
        return [_lower(item, xgr) for item in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema")
        text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
        grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        return {"type": "grammar", "grammar": str(grammar)}
    return {key: _lower(value, xgr) for key, value in fmt.items()}


def _clean_message(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return _CPP_PREFIX.sub("", text).strip()


class GrammarCompiler:
    """Compiles structural tags against the served tokenizer, with an LRU cache by tag text.

    The cache is bounded by count and by bytes: a grammar compiled for a 150k-token vocabulary
    holds token masks of its own, megabytes for a large schema. Thread-safe: the front end
    compiles off the event loop, several requests at once.
    """

    def __init__(
        self,
        tokenizer: LanguageTokenizer,
        vocab_size: int,
        cache_size: int = 256,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        if cache_size < 1 or cache_bytes < 1:
            raise ValueError("cache_size and cache_bytes must be >= 1")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._compiler: Any = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses, for tests and logs

    def _backend(self) -> Any:
        with self._lock:
            if self._compiler is None:
                info = build_tokenizer_info(self._tokenizer, self.vocab_size)
                # xgrammar's own cache would keep every grammar forever; ours is bounded
                self._compiler = _xgrammar().GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def compile(self, fmt: dict[str, Any]) -> CompiledGrammar:
        """The compiled grammar of a structural-tag format (`{"type": "json_schema", ...}`,
        `{"type": "sequence", "elements": [...]}`, ...); GrammarError when it does not compile."""
        key = json.dumps(fmt, ensure_ascii=False)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        backend = self._backend()
        try:
            lowered = _lower(fmt, _xgrammar())
            tag = json.dumps({"type": "structural_tag", "format": lowered}, ensure_ascii=False)
            compiled = backend.compile_structural_tag(tag)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / pydantic errors
            raise GrammarError(_clean_message(exc)) from exc
        grammar = CompiledGrammar(compiled, key, int(getattr(compiled, "memory_size_bytes", 0)))
        with self._lock:
            self.num_compiled += 1
            if key not in self._cache:
                self._cache[key] = grammar
                self._num_bytes += grammar.num_bytes
            while len(self._cache) > 1 and (
                len(self._cache) > self.cache_size or self._num_bytes > self.cache_bytes
            ):
                self._num_bytes -= self._cache.popitem(last=False)[1].num_bytes
        return grammar


class TokenBitmask:
    """The step's grammar bitmask: filled for all grammar rows in one batched xgrammar call,
    copied to the logits' device once and applied there in place (one kernel on CUDA)."""

    def __init__(self) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self._batch = xgr.BatchGrammarMatcher()
        self._host: torch.Tensor | None = None  # [rows, ceil(V / 32)] int32, reused

    def _buffer(self, num_rows: int, vocab_size: int, pin: bool) -> torch.Tensor:
        width = (vocab_size + 31) // 32
        host = self._host
        if host is None or host.shape[0] < num_rows or host.shape[1] != width:
            host = torch.empty((max(num_rows, 8), width), dtype=torch.int32)
            self._host = host.pin_memory() if pin else host
        mask = self._host[:num_rows]
        mask.fill_(-1)  # rows without a grammar allow everything
        return mask

    def apply(self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Any]) -> None:
        """Mask, in place, every token the matcher of logits row rows[i] does not allow."""
        num_rows, vocab_size = logits.shape
        pin = logits.device.type == "cuda"
        mask = self._buffer(num_rows, vocab_size, pin)
        indices = list(rows)
        self._batch.batch_fill_next_token_bitmask(list(matchers), mask, indices)
        device_mask = mask.to(logits.device, non_blocking=True) if pin else mask
        self._xgr.apply_token_bitmask_inplace(
            logits, device_mask, vocab_size=vocab_size, indices=indices
        )
