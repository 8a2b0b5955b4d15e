"""Monolithic Qwen3-VL-MoE: vision tower + the unified language model, for tests and tools.

The disaggregated path runs the same pieces in two processes: `Qwen3VLVisionModel` on the encode
side, `Qwen3MoeForCausalLM` on the language side, joined by the packed tensor
(`shared.wire.packed`).
"""

from __future__ import annotations

import torch
from torch import nn

from shared.model.config import ModelConfig
from shared.model.layers.linear import Linear
from shared.model.processing import grids_in_prompt_order, mrope_positions
from shared.model.qwen3_moe import Qwen3MoeModel
from shared.model.vision import Qwen3VLVisionModel
from shared.wire.packed import separate_deepstack_embeds


def splice_image_embeds(
    input_ids: torch.Tensor,  # [T]
    text_embeds: torch.Tensor,  # [T, H]
    image_embeds: torch.Tensor,  # [n, H]
    deepstack: torch.Tensor,  # [n, k*H]
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace pad rows by image rows in order; build the zero-padded deepstack `[T, k*H]`."""
    mask = input_ids == image_token_id
    num_pads = int(mask.sum())
    if num_pads != image_embeds.shape[0]:
        raise ValueError(
            f"{num_pads} image pad tokens but {image_embeds.shape[0]} image embedding rows"
        )
    embeds = text_embeds.clone()
    embeds[mask] = image_embeds.to(embeds.dtype)
    full_deepstack = embeds.new_zeros(embeds.shape[0], deepstack.shape[1])
    full_deepstack[mask] = deepstack.to(embeds.dtype)
    return embeds, full_deepstack


class Qwen3VLMoeForConditionalGeneration(nn.Module):
    """`visual` + `model: Qwen3MoeModel` + `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vision is None:
            raise ValueError("Qwen3VLMoeForConditionalGeneration needs a vision_config")
        self.config = config
        self.visual = Qwen3VLVisionModel(config.vision)
        self.model = Qwen3MoeModel(config.text)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def separate_deepstack_embeds(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return separate_deepstack_embeds(packed, self.config.num_deepstack)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        pixel_values: torch.Tensor | None = None,  # [N, patch_dim]
        image_grid_thw: torch.Tensor | None = None,  # [num_images, 3]
        pixel_values_videos: torch.Tensor | None = None,  # [M, patch_dim]
        video_grid_thw: torch.Tensor | None = None,  # [num_videos, 3]
    ) -> torch.Tensor:  # [T, V]
        """Whole-sequence forward (no KV cache) of one prompt with any images and videos."""
        cfg = self.config
        embeds = self.model.embed_tokens(input_ids)
        deepstack = None
        media = (
            (pixel_values, image_grid_thw, cfg.image_token_id),
            (pixel_values_videos, video_grid_thw, cfg.video_token_id),
        )
        for pixels, grid_thw, pad_id in media:
            if pixels is None:
                continue
            if grid_thw is None:
                raise ValueError("pixel values given without their grid_thw")
            rows, rows_deepstack = self.separate_deepstack_embeds(self.visual(pixels, grid_thw))
            embeds, spliced = splice_image_embeds(input_ids, embeds, rows, rows_deepstack, pad_id)
            deepstack = spliced if deepstack is None else deepstack + spliced
        grids = grids_in_prompt_order(
            input_ids.tolist(),
            [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()],
            [] if video_grid_thw is None else [tuple(g) for g in video_grid_thw.tolist()],
            cfg.image_token_id,
            cfg.video_token_id,
            cfg.vision.spatial_merge_size,
        )
        positions, _ = mrope_positions(
            input_ids.cpu(), grids, cfg.vision_pad_ids, cfg.vision.spatial_merge_size
        )
        hidden = self.model(
            inputs_embeds=embeds,
            positions=positions.to(embeds.device),
            input_deepstack_embeds=deepstack,
        )
        return self.lm_head(hidden)
