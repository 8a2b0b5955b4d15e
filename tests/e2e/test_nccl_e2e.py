"""The same answers when embeddings travel over a torch.distributed link (gloo on CPU)."""

from __future__ import annotations

from tests.e2e.checks import ask, ask_streamed, check_answer


def test_image_and_text_chat_over_a_link(nccl_cluster, e2e_model, reference):
    cases = [*e2e_model.image_cases(2, seed=20), (None, "Hello there!")]
    for image, question in cases:
        response, prompt_ids, token_ids = ask(nccl_cluster, e2e_model, question, image)
        check_answer(reference, e2e_model, question, image, prompt_ids, token_ids)
        _, streamed_ids, reason, usage = ask_streamed(nccl_cluster, e2e_model, question, image)
        assert usage.prompt_tokens == len(prompt_ids)
        assert reason == response.choices[0].finish_reason
        check_answer(reference, e2e_model, question, image, prompt_ids, streamed_ids)
