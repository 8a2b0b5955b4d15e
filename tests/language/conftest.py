"""Fixtures for the language-service tests: the tiny checkpoint with a tokenizer, image inputs."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch

from scripts.testkit.tokenizers import save_tokenizer
from tests.encode.conftest import encode_service, reference  # noqa: F401 (client tests use them)
from tests.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB

TINY_SPECIAL_IDS = {
    "<|image_pad|>": IMAGE_TOKEN_ID,
    "<|video_pad|>": VIDEO_TOKEN_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
}


@pytest.fixture(scope="session")
def tiny_vl_model_dir(tiny_vl_dir, tmp_path_factory):
    """The tiny Qwen3-VL-MoE checkpoint plus a byte-level tokenizer pinned to its special ids."""
    path = tmp_path_factory.mktemp("tiny_vl_tok")
    for item in tiny_vl_dir.iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    save_tokenizer(path, "{{ messages }}", special_ids=TINY_SPECIAL_IDS, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def tiny_vl_hf(tiny_vl):
    """The transformers model that wrote the tiny checkpoint (fp32, eval)."""
    return tiny_vl[1]


@pytest.fixture(scope="session")
def tiny_vision(tiny_vl_dir):
    """The vision tower of the tiny checkpoint, loaded by shared.model."""
    from shared.model.loader import load_vision_model

    return load_vision_model(tiny_vl_dir, dtype=torch.float32).eval()


def make_sequence(
    token_ids: list[int],
    images: tuple = (),
    image_token_id: int = IMAGE_TOKEN_ID,
    request_id: str = "r",
    **sampling,
):
    """An engine RequestState for unit tests; ``images`` are EncodedImages on the pad ids."""
    from services.language.engine.request import GenerationRequest, RequestState, SamplingParams

    request = GenerationRequest(
        request_id, tuple(token_ids), tuple(images), SamplingParams(**sampling), 0.0
    )
    return RequestState.of(request, image_token_id)


def fake_image(num_tokens: int, content_hash: str, hidden: int = 4):
    """An EncodedImage with random rows (for cache/scheduler tests that never run a model)."""
    from shared.wire.images import EncodedImage

    return EncodedImage(torch.randn(num_tokens, hidden), (1, 2, 2 * num_tokens), content_hash)


# -- engine parity helpers -------------------------------------------------------------------

TIE_TOLERANCE = 1e-4  # DESIGN.md: below this top-2 gap, float noise may flip a greedy argmax


@dataclass(frozen=True)
class PromptCase:
    """A tokenized prompt with its images in both forms: pixels for HF, embeddings for us."""

    ids: torch.Tensor  # [T] long, pads expanded
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None  # [num_images, 3]
    images: tuple


def make_prompt_case(vision, text_runs, image_sizes, seed) -> PromptCase:
    """Random text runs around random images of (w, h) sizes, encoded by the vision tower."""
    import hashlib

    from shared.wire.images import EncodedImage
    from tests.model.helpers import images_inputs, prompt_ids

    if not image_sizes:
        return PromptCase(prompt_ids(text_runs, [], seed=seed), None, None, ())
    pixel_values, grid = images_inputs(image_sizes, seed=seed)
    ids = prompt_ids(text_runs, grid.tolist(), seed=seed)
    images, row = [], 0
    for i, thw in enumerate(grid.tolist()):
        patches = thw[0] * thw[1] * thw[2]
        with torch.no_grad():
            packed = vision(pixel_values[row : row + patches], grid[i : i + 1])
        digest = hashlib.sha256(pixel_values[row : row + patches].numpy().tobytes()).hexdigest()
        images.append(EncodedImage(packed, tuple(thw), digest))
        row += patches
    return PromptCase(ids, pixel_values, grid, tuple(images))


def _hf_kwargs(case: PromptCase, ids: torch.Tensor) -> dict:
    if case.pixel_values is None:
        return {}
    return dict(
        pixel_values=case.pixel_values,
        image_grid_thw=case.grid_thw,
        mm_token_type_ids=(ids == IMAGE_TOKEN_ID).long()[None],
    )


@torch.no_grad()
def hf_greedy(hf_model, case: PromptCase, max_new_tokens: int) -> list[int]:
    """transformers generate, greedy, batch of one."""
    out = hf_model.generate(
        input_ids=case.ids[None],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        min_new_tokens=max_new_tokens,
        **_hf_kwargs(case, case.ids),
    )
    return out[0, case.ids.shape[0] :].tolist()


@torch.no_grad()
def hf_output_logits(hf_model, case: PromptCase, output_ids: list[int]) -> torch.Tensor:
    """Teacher-forced HF logits [len(output_ids), V] predicting each output token."""
    ids = torch.cat([case.ids, torch.tensor(output_ids, dtype=torch.long)])
    logits = hf_model(input_ids=ids[None], **_hf_kwargs(case, ids)).logits[0]
    num_prompt = case.ids.shape[0]
    return logits[num_prompt - 1 : num_prompt - 1 + len(output_ids)]


def assert_greedy_parity(hf_model, case: PromptCase, ours: list[int], oracle: list[int]) -> None:
    """Our greedy tokens equal HF generate's, except after a genuine near-tie.

    Teacher forcing on our own tokens checks every step: each token must be HF's argmax, or
    within TIE_TOLERANCE of it. Where we differ from generate, the first differing step must be
    such a near-tie (the prefixes agree there, so HF saw the same context).
    """
    logits = hf_output_logits(hf_model, case, ours)
    for step, token in enumerate(ours):
        best = logits[step].max().item()
        gap = best - logits[step, token].item()
        assert gap <= TIE_TOLERANCE, (
            f"step {step}: token {token} is {gap:.2e} below HF's argmax "
            f"{int(logits[step].argmax())}; ours {ours}, HF {oracle}"
        )
    if ours != oracle:
        first = next(i for i, (a, b) in enumerate(zip(ours, oracle, strict=False)) if a != b)
        gap = abs(logits[first, ours[first]].item() - logits[first, oracle[first]].item())
        assert gap <= TIE_TOLERANCE, f"diverged from generate at step {first} without a tie"


def greedy_request(request_id: str, case: PromptCase, max_tokens: int, **sampling):
    from services.language.engine.request import GenerationRequest, SamplingParams

    params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
    return GenerationRequest(
        request_id, tuple(case.ids.tolist()), case.images, SamplingParams(**params), 0.0
    )


async def collect(engine, requests) -> dict[str, list]:
    """Run ``requests`` concurrently; each id maps to its list of RequestOutputs."""
    import asyncio

    async def one(request):
        return [out async for out in engine.generate(request)]

    results = await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), timeout=120)
    return {r.request_id: outs for r, outs in zip(requests, results, strict=True)}


def run_engine(model_dir, config, requests):
    """Start an AsyncEngine on ``model_dir``, run ``requests`` at once, stop it.

    Returns ({request_id: output token ids}, {request_id: outputs}, final EngineStats).
    """
    import asyncio

    from services.language.engine import AsyncEngine

    async def main():
        engine = AsyncEngine.from_model_dir(model_dir, config)
        await engine.start()
        try:
            outputs = await collect(engine, requests)
            return outputs, engine.stats()
        finally:
            await engine.shutdown()

    outputs, stats = asyncio.run(main())
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}
    return tokens, outputs, stats
