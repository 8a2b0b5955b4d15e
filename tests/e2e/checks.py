"""Asking a cluster through the openai client and checking the answer against transformers."""

from __future__ import annotations

from tests.e2e.conftest import Cluster, E2EModel
from tests.e2e.reference import Reference
from tests.e2e.support import data_url


def chat_messages(question: str, image: bytes | None = None) -> list[dict]:
    """One user turn: the image (as a data URL) then the question."""
    if image is None:
        return [{"role": "user", "content": question}]
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": question},
    ]
    return [{"role": "user", "content": parts}]


def ask(cluster: Cluster, model: E2EModel, question: str, image: bytes | None = None):
    """Non-streamed greedy chat; returns (response, prompt ids, answer ids)."""
    response = cluster.client().chat.completions.create(
        model=cluster.model_name, messages=chat_messages(question, image), **model.greedy()
    )
    return (
        response,
        response.model_extra["prompt_token_ids"],
        response.choices[0].model_extra["token_ids"],
    )


def ask_streamed(cluster: Cluster, model: E2EModel, question: str, image: bytes | None = None):
    """Streamed greedy chat with usage; returns (text, answer ids, finish reason, usage)."""
    stream = cluster.client().chat.completions.create(
        model=cluster.model_name,
        messages=chat_messages(question, image),
        stream=True,
        stream_options={"include_usage": True},
        **model.greedy(),
    )
    text, ids, reason, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids", [])
            reason = choice.finish_reason or reason
    return text, ids, reason, usage


def check_answer(
    reference: Reference,
    model: E2EModel,
    question: str,
    image: bytes | None,
    prompt_ids: list[int],
    token_ids: list[int],
) -> None:
    """The served prompt is transformers' and the answer is its greedy answer."""
    images = [image] if image is not None else []
    assert prompt_ids == reference.prompt_ids(chat_messages(question, image), images)
    reference.check(prompt_ids, token_ids, images, model.greedy()["max_tokens"])
