"""A small byte-level BPE tokenizer for the shapes task, with the Qwen special tokens by name.

The pipeline (NFC, Qwen's pre-tokenization regex, byte-level BPE) is the one transformers'
`Qwen2Tokenizer` builds, so the saved directory loads the same way with `tokenizer.json` or with
the class alone. Byte-level BPE encodes any text and decodes it back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import BPE

from scripts.testkit.tokenizers import EOS_TOKEN, PAD_TOKEN, QWEN_SPECIAL_TOKENS

# Qwen's order; they follow the learned tokens, as in the real checkpoints.
SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS
# Qwen2's pre-tokenization regex (transformers/models/qwen2/tokenization_qwen2.py).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Text the chat template wraps around every message; the tokenizer learns it as whole tokens.
TEMPLATE_TEXT = ("user\n", "assistant\n", "system\n", "\n", "You are a helpful assistant.")


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `texts` to `vocab_size` learned tokens, then add the specials."""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    # Every conversation carries the template text, so weight it like one text per example.
    texts += list(TEMPLATE_TEXT) * max(1, len(texts) // 2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of each special token by name."""
    return {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}


def tokenizer_config(tokenizer: Tokenizer, chat_template: str) -> dict:
    """tokenizer_config.json content, in the form of the Qwen3-VL checkpoints."""
    added = {
        str(tokenizer.token_to_id(name)): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 4096,
        "chat_template": chat_template,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, chat_template: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(tokenizer, chat_template)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template)
