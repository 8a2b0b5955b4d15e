"""The transformers oracle for end-to-end answers: expected prompt ids and greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tests.e2e.support import greedy_disagreements, hf_image_inputs


class Reference:
    """Prompt ids from transformers' apply_chat_template and answers from its greedy `generate`.

    The served answer must equal `generate` token for token, except where transformers' own
    top-2 logits are a near tie (float noise from batching may flip those; common on random
    weights, rare on the trained model): then every served token must still be transformers'
    argmax given the served prefix (teacher forcing).
    """

    def __init__(self, model_dir: Path, hf_model, trained: bool) -> None:
        from transformers import PreTrainedTokenizerFast

        from shared.model.config import load_config
        from shared.model.processing import load_image_processor_config

        self.model_dir = model_dir
        self.hf_model = hf_model
        self.trained = trained
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        config = load_config(model_dir)
        self.image_token_id = config.image_token_id
        self.merge = load_image_processor_config(model_dir).merge_size
        self.eos_ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self._generated: dict[tuple, list[int]] = {}

    def prompt_ids(self, messages: list[dict], images: Sequence[bytes]) -> list[int]:
        """What the served prompt must be: the chat template's ids, each pad expanded."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if not images:
            return list(ids)
        _, grid = hf_image_inputs(self.model_dir, images)
        counts = iter(int(g.prod()) // (self.merge * self.merge) for g in grid)
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return expanded

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[int], images: Sequence[bytes], max_new_tokens: int
    ) -> list[int]:
        """transformers' greedy generation (stopping at EOS only for a trained model)."""
        key = (tuple(prompt_ids), tuple(images), max_new_tokens)
        if key not in self._generated:
            ids = torch.tensor([list(prompt_ids)])
            kwargs = {}
            if images:
                pixel_values, grid = hf_image_inputs(self.model_dir, images)
                kwargs = dict(
                    pixel_values=pixel_values,
                    image_grid_thw=grid,
                    mm_token_type_ids=(ids == self.image_token_id).long(),
                )
            eos = sorted(self.eos_ids) if self.trained else None
            out = self.hf_model.generate(
                input_ids=ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
                **kwargs,
            )
            self._generated[key] = out[0, ids.shape[1] :].tolist()
        return self._generated[key]

    def _strip_eos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        while ids and ids[-1] in self.eos_ids:
            ids.pop()
        return ids

    def check(
        self,
        prompt_ids: Sequence[int],
        token_ids: Sequence[int],
        images: Sequence[bytes],
        max_new_tokens: int,
    ) -> None:
        """Raise AssertionError unless `token_ids` is transformers' greedy answer."""
        expected = self.generate(prompt_ids, images, max_new_tokens)
        if self._strip_eos(token_ids) == self._strip_eos(expected):
            return
        pixel_values, grid = hf_image_inputs(self.model_dir, images) if images else (None, None)
        problems = greedy_disagreements(
            self.hf_model, prompt_ids, token_ids, self.image_token_id, pixel_values, grid
        )
        assert problems == [], f"served {list(token_ids)}, transformers {expected}: {problems}"
