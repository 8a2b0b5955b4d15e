"""Greedy answers to questions about clips, with transformers or with the project's model.

Both decode the clip's mp4 bytes and sample and preprocess it as the encode service does
(`shared.model.video_decode.load_video` with the checkpoint's `video_preprocessor_config.json`)
and build the prompt as transformers' Qwen3-VL processor renders a video: per temporal group its
time, then its pads (`video_prompts`). Used by `evaluate` (`--videos N`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from scripts.shapes_vl.answers import ablate, decode_answer, hf_greedy, shared_greedy
from scripts.shapes_vl.prompts import SpecialIds
from scripts.shapes_vl.video_prompts import SampledVideo, make_mixed_batch, video_prompt_ids
from shared.model.video import load_video_processor_config
from shared.model.video_decode import load_video
from shared.wire.images import VideoSampling

HELD_OUT_VIDEO_SEED = 20_251_207
VideoAnswerer = Callable[[bytes, str], str]


def sample(model_dir: Path, data: bytes) -> SampledVideo:
    """The clip decoded, sampled and preprocessed with the checkpoint's video config."""
    clip = load_video(data, (), VideoSampling(), load_video_processor_config(model_dir))
    return SampledVideo(clip.pixel_values, clip.grid_thw, clip.timestamps)


def hf_video_answerer(model_dir: Path, model=None) -> VideoAnswerer:
    """Greedy answers from transformers' model (loaded from `model_dir` unless given)."""
    from transformers import AutoImageProcessor, Qwen3VLMoeForConditionalGeneration

    if model is None:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    sp = SpecialIds.from_tokenizer(tokenizer)

    def answer(data: bytes, question: str) -> str:
        video = sample(model_dir, data)
        batch = make_mixed_batch(tokenizer, image_processor, [], [(video, [(question, None)])])
        return hf_greedy(model, batch, tokenizer, sp)

    return answer


def shared_video_answerer(model_dir: Path, mode: str = "full") -> VideoAnswerer:
    """Greedy answers from `shared.model`'s vision tower + language model (no KV cache): the
    tower encodes each temporal group as a picture of its own, as the encode service does.

    `mode` "no_deepstack" zeroes the deepstack embeddings, "no_image" the video embeddings.
    """
    from shared.model.config import load_config
    from shared.model.loader import load_text_model, load_vision_model
    from shared.model.qwen3_vl_moe import separate_deepstack_embeds

    config = load_config(model_dir)
    vision = load_vision_model(model_dir).eval()
    language = load_text_model(model_dir).eval()
    merge = load_video_processor_config(model_dir).merge_size
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sp = SpecialIds.from_tokenizer(tokenizer)
    pad_id = config.video_token_id

    @torch.no_grad()
    def answer(data: bytes, question: str) -> str:
        video = sample(model_dir, data)
        t, h, w = video.grid_thw
        groups = [(1, h, w)] * t
        packed = torch.cat(
            [
                vision(rows, torch.tensor([group]))
                for rows, group in zip(video.pixel_values.chunk(t), groups, strict=True)
            ]
        )
        embeds, deepstack = ablate(*separate_deepstack_embeds(packed, config.num_deepstack), mode)
        ids = video_prompt_ids(tokenizer, question, video.timestamps, h * w // merge**2)
        new = shared_greedy(language, ids, embeds, deepstack, groups, pad_id, merge, sp.im_end)
        return decode_answer(tokenizer, new, sp.im_end)

    return answer
