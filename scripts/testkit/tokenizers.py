"""A small byte-level BPE tokenizer with Qwen's chat special tokens, for checkpoints without one.

Special tokens can be pinned to the ids a model config expects (image_token_id, ...), so a tiny
random checkpoint and this tokenizer agree on what `<|image_pad|>` is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Qwen's chat and vision special tokens, in the order of Qwen's vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def _byte_vocab() -> dict[str, int]:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return {symbol: index for index, symbol in enumerate(sorted(alphabet))}


def build_tokenizer(
    special_ids: Mapping[str, int] | None = None, vocab_size: int = 300
) -> Tokenizer:
    """Byte-level BPE (bytes only, no merges) plus the chat special tokens.

    `special_ids` pins chosen special tokens to ids; the rest follow the byte alphabet.
    """
    vocab = _byte_vocab()
    pinned = dict(special_ids or {})
    next_id = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        if token not in pinned:
            while next_id in pinned.values():
                next_id += 1
            pinned[token] = next_id
            next_id += 1
    taken = set(vocab.values())
    for token, token_id in pinned.items():
        if token_id in taken or token_id >= vocab_size:
            raise ValueError(f"cannot place {token} at id {token_id} (vocab {vocab_size})")
        vocab[token] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(pinned))
    return tokenizer


def save_tokenizer(
    model_dir: str | Path,
    chat_template: str | None,
    special_ids: Mapping[str, int] | None = None,
    vocab_size: int = 300,
) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and (unless None) chat_template.jinja."""
    model_dir = Path(model_dir)
    tokenizer = build_tokenizer(special_ids, vocab_size)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 4096,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if chat_template is not None:
        (model_dir / "chat_template.jinja").write_text(chat_template)
    return tokenizer
