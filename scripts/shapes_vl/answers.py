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


def ablate(embeds: torch.Tensor, deepstack: torch.Tensor, mode: str):
    """(embeds, deepstack) with the deepstack ("no_deepstack") or the main embeddings
    ("no_image") zeroed; "full" leaves both."""
    if mode == "no_deepstack":
        deepstack = torch.zeros_like(deepstack)
    elif mode == "no_image":
        embeds = torch.zeros_like(embeds)
    return embeds, deepstack


@torch.no_grad()
def shared_greedy(language, ids, embeds, deepstack, grids, pad_id: int, merge: int, stop: int):
    """`shared.model`'s greedy continuation of prompt `ids` (no KV cache: the whole sequence
    each step) with `embeds`/`deepstack` spliced at the `pad_id` tokens of `grids`; the new ids."""
    from shared.model.processing import mrope_positions
    from shared.model.qwen3_vl_moe import splice_image_embeds

    ids = list(ids)
    prompt_len = len(ids)
    for _ in range(MAX_NEW_TOKENS):
        input_ids = torch.tensor(ids)
        inputs_embeds, full_deepstack = splice_image_embeds(
            input_ids, language.embed_tokens(input_ids), embeds, deepstack, pad_id
        )
        positions, _ = mrope_positions(input_ids, grids, pad_id, merge)
        logits = language(
            positions=positions,
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=full_deepstack,
            logits_indices=torch.tensor([len(ids) - 1]),
        )
        ids.append(int(logits[0].argmax()))
        if ids[-1] == stop:
            break
    return ids[prompt_len:]
