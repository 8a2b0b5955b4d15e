"""The trained shapes model through the split path: accurate, and the same over every route.

40 held-out questions go HTTP -> language -> encode (real processes) with the embeddings inline in
gRPC, then over the torch.distributed link (gloo on CPU), and through `shared.model` in this
process. The trained checkpoint's answers have wide margins, so the three must agree exactly.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from scripts.shapes_vl.data import Example, make_dataset
from scripts.shapes_vl.evaluate import HELD_OUT_SEED
from scripts.shapes_vl.prompts import prompt_ids
from shared.model.config import load_config
from shared.model.loader import load_text_model, load_vision_model
from shared.model.processing import (
    load_image_processor_config,
    mrope_positions,
    num_image_tokens,
    preprocess_image,
)
from shared.model.qwen3_vl_moe import separate_deepstack_embeds, splice_image_embeds
from tests.e2e.checks import chat_messages
from tests.e2e.conftest import Cluster

NUM_QUESTIONS = 40
MIN_ACCURACY = 0.9
IN_FLIGHT = 16
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def held_out(e2e_model) -> list[Example]:
    if not e2e_model.trained:
        pytest.fail(
            "models/shapes-vl (the trained checkpoint) is missing: these checks need its "
            "answers; train it with scripts/shapes_vl/train.py or set SPLITVL_E2E_MODEL"
        )
    return make_dataset(HELD_OUT_SEED, NUM_QUESTIONS)


def _png(example: Example) -> bytes:
    buf = io.BytesIO()
    example.image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Served:
    """One answer from a cluster: its text and the token ids on both sides of it."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int]  # the answer's tokens, ending with the stop token


def _conversations(examples: list[Example]) -> list[list[dict]]:
    return [chat_messages(ex.question, _png(ex)) for ex in examples]


async def answer_all(cluster: Cluster, conversations: list[list[dict]]) -> list[Served]:
    """Greedy answers to every conversation (chat messages), IN_FLIGHT requests at a time, in
    order; each must stop within 32 tokens."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with cluster.async_client(timeout=REQUEST_TIMEOUT_S) as client:

        async def ask(messages: list[dict]) -> Served:
            async with gate:
                response = await client.chat.completions.create(
                    model=cluster.model_name,
                    temperature=0,
                    max_tokens=32,
                    messages=messages,
                    extra_body={"return_token_ids": True},
                )
            choice = response.choices[0]
            assert choice.finish_reason == "stop", f"{messages!r:.300}: no stop in 32 tokens"
            return Served(
                choice.message.content,
                response.model_extra["prompt_token_ids"],
                choice.model_extra["token_ids"],
            )

        return list(await asyncio.gather(*(ask(m) for m in conversations)))


class InProcessModel:
    """`shared.model`'s vision tower and language model in this process (as evaluate.py runs)."""

    def __init__(self, model_dir: Path) -> None:
        self.config = load_config(model_dir)
        self.processor = load_image_processor_config(model_dir)
        self.vision = load_vision_model(model_dir).eval()
        self.language = load_text_model(model_dir).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    @torch.no_grad()
    def check(self, example: Example, served: Served) -> list[str]:
        """Differences between `served` and this model's greedy answer (empty: identical).

        One causal forward over prompt + answer gives the argmax after every prefix; the greedy
        answer equals the served one exactly when each argmax is the served next token (the
        last being the stop token), so one forward replaces a token-by-token decode.
        """
        pixels, grid = preprocess_image(example.image, self.processor)
        expected_prompt = prompt_ids(
            self.tokenizer, example.question, num_image_tokens(grid, self.processor.merge_size)
        )
        if served.prompt_ids != expected_prompt:
            return [f"{example.question!r}: served prompt differs from the training format"]
        embeds, deepstack = separate_deepstack_embeds(
            self.vision(pixels, torch.tensor([grid])), self.config.num_deepstack
        )
        ids = torch.tensor(served.prompt_ids + served.token_ids[:-1])
        image_token_id = self.config.image_token_id
        inputs_embeds, full_deepstack = splice_image_embeds(
            ids, self.language.embed_tokens(ids), embeds, deepstack, image_token_id
        )
        positions, _ = mrope_positions(ids, [grid], image_token_id, self.processor.merge_size)
        rows = torch.arange(len(served.prompt_ids) - 1, len(ids))
        logits = self.language(
            positions=positions,
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=full_deepstack,
            logits_indices=rows,
        )
        greedy = logits.argmax(-1).tolist()
        if greedy == served.token_ids:
            return []
        return [f"{example.question!r}: served {served.token_ids}, in-process greedy {greedy}"]


def _misses(answers: list[Served], examples: list[Example]) -> list[str]:
    pairs = zip(answers, examples, strict=True)
    return [
        f"{ex.question!r}: got {got.text!r}, want {ex.answer!r}"
        for got, ex in pairs
        if got.text != ex.answer
    ]


@pytest.fixture(scope="module")
def grpc_answers(grpc_cluster, held_out) -> list[Served]:
    return asyncio.run(answer_all(grpc_cluster, _conversations(held_out)))


def test_split_path_answers_held_out_questions(grpc_answers, held_out):
    misses = _misses(grpc_answers, held_out)
    accuracy = 1 - len(misses) / len(held_out)
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.3f} exact; misses:\n" + "\n".join(misses)


def test_link_transport_gives_the_same_answers(nccl_cluster, held_out, grpc_answers):
    assert asyncio.run(answer_all(nccl_cluster, _conversations(held_out))) == grpc_answers


@pytest.fixture
def one_thread() -> Iterator[None]:
    # The tiny model's matrices are small: with two threads, OpenMP spin-waiting on a shared
    # machine makes each forward many times slower than with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_in_process_model_gives_the_same_answers(e2e_model, held_out, grpc_answers, one_thread):
    model = InProcessModel(e2e_model.path)
    problems = [
        p
        for ex, served in zip(held_out, grpc_answers, strict=True)
        for p in model.check(ex, served)
    ]
    assert not problems, "\n".join(problems)
