"""What the image and clip evaluations share: greedy generation with transformers' model and
turning generated ids into an answer (cut at <|im_end|>)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from scripts.shapes_vl.prompts import SpecialIds

MAX_NEW_TOKENS = 32


def decode_answer(tokenizer: Tokenizer, ids: list[int], stop: int) -> str:
    """The text of generated `ids` up to `stop` (excluded)."""
    if stop in ids:
        ids = ids[: ids.index(stop)]
    return tokenizer.decode(ids, skip_special_tokens=False)


def hf_greedy(model, batch, tokenizer: Tokenizer, sp: SpecialIds) -> str:
    """transformers' greedy answer to a one-row batch (`prompts.Batch` or `video_prompts`')."""
    with torch.no_grad():
        out = model.generate(
            **batch.model_inputs(),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=sp.im_end,
            pad_token_id=sp.pad,
        )
    return decode_answer(tokenizer, out[0, batch.input_ids.shape[1] :].tolist(), sp.im_end)
