"""--reasoning-parser qwen3 through the HTTP API, with a template that opens <think> the way
Qwen3's thinking templates do: the answer of a thinking prompt is reasoning_content (streamed as
delta reasoning_content), usage counts it; chat_template_kwargs turns thinking off."""

from __future__ import annotations

import openai
import pytest
from transformers import PreTrainedTokenizerFast

from services.language.frontend.pipeline import FrontendOptions
from tests.language.serving import SHAPES_VL, chat_server

MODEL = "shapes-vl"
GENERATION_PROMPT = "    {{- '<|im_start|>assistant\\n' }}\n"
THINKING = GENERATION_PROMPT + (
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<think>\\n' }}\n"
    "    {%- endif %}\n"
)
QUESTION = [{"role": "user", "content": "Describe the image."}]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    source = (SHAPES_VL / "chat_template.jinja").read_text()
    assert GENERATION_PROMPT in source
    return source.replace(GENERATION_PROMPT, THINKING)


@pytest.fixture(scope="module")
def hf_tokenizer(template):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHAPES_VL)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def client(template):
    options = FrontendOptions(reasoning_parser="qwen3")
    with chat_server(SHAPES_VL, options=options, chat_template=template) as srv:
        yield openai.OpenAI(
            base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120
        )


def ask(client, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )


def test_a_prompt_that_opens_thinking_answers_in_reasoning(client, hf_tokenizer):
    response = ask(client)
    prompt_ids = response.model_extra["prompt_token_ids"]
    expected = hf_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt_ids == list(expected)
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    token_ids = response.choices[0].model_extra["token_ids"]
    assert reasoning == hf_tokenizer.decode(token_ids, skip_special_tokens=True)
    assert reasoning and not message.content  # the model never closes </think>
    usage = response.usage
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert all(not d.content for d in deltas)
    assert all(c.usage is not None for c in chunks)  # continuous usage: on every chunk
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens


def test_chat_template_kwargs_turn_thinking_off(client, hf_tokenizer):
    response = ask(client, chat_template_kwargs={"enable_thinking": False})
    expected = hf_tokenizer.apply_chat_template(
        QUESTION,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        enable_thinking=False,
    )
    assert response.model_extra["prompt_token_ids"] == list(expected)
    message = response.choices[0].message
    assert message.content and message.model_extra["reasoning_content"] is None
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_reserved_template_variables_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        ask(client, chat_template_kwargs={"messages": []})
