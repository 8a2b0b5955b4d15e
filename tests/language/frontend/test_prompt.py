"""Chat prompt rendering and image-pad expansion, checked against apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from scripts.testkit.tokenizers import save_tokenizer
from services.language.errors import BadRequestError
from services.language.frontend.prompt import (
    ChatMessage,
    ChatTemplate,
    ChatTemplateNotFoundError,
    ImagePart,
    PromptBuilder,
    TextPart,
    collect_images,
    load_chat_template_source,
    message_to_template_dict,
)
from tests.e2e.support import template_source

IMAGE = ImagePart(url="data:image/png;base64,AAAA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory, template_source())
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def builder(model_dir, hf_tokenizer) -> PromptBuilder:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return PromptBuilder(
        ChatTemplate.from_model_dir(model_dir),
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        image_token_id=tokenizer.token_to_id("<|image_pad|>"),
    )


CONVERSATIONS = {
    "text": [ChatMessage("user", "Hello there")],
    "system_and_user": [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")],
    "image_then_text": [ChatMessage("user", (IMAGE, TextPart("Describe this image.")))],
    "two_images_multi_turn": [
        ChatMessage("system", (TextPart("You see images."),)),
        ChatMessage("user", (TextPart("First:"), IMAGE, TextPart("Second:"), IMAGE)),
        ChatMessage("assistant", "A red square and a blue circle."),
        ChatMessage("user", "Which one is bigger?"),
    ],
    "assistant_parts_and_tool": [
        ChatMessage("user", "Call the tool"),
        ChatMessage("assistant", (TextPart("ok"),)),
        ChatMessage("tool", (TextPart("result"), IMAGE)),
        ChatMessage("tool", "second result"),
    ],
    "developer_role": [ChatMessage("developer", "Answer in French."), ChatMessage("user", "Hi")],
    "unicode": [ChatMessage("user", "Ünïcödé ✓ 漢字 \n\t spaces  ")],
}


def _hf_messages(messages: list[ChatMessage]) -> list[dict]:
    # What an OpenAI client sends: image parts as image_url; "developer" renamed as the server does
    out = []
    for message in messages:
        item = message_to_template_dict(message)
        if isinstance(item["content"], list):
            item["content"] = [
                {"type": "image_url", "image_url": {"url": IMAGE.url}}
                if part["type"] == "image"
                else part
                for part in item["content"]
            ]
        out.append(item)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_and_tokens_match_transformers(name, builder, hf_tokenizer):
    messages = CONVERSATIONS[name]
    hf_messages = _hf_messages(messages)
    expected_text = hf_tokenizer.apply_chat_template(
        hf_messages, tokenize=False, add_generation_prompt=True
    )
    expected_ids = hf_tokenizer.apply_chat_template(
        hf_messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert builder.render(messages) == expected_text
    assert builder.tokenize(messages) == list(expected_ids)


def test_known_rendering_of_one_image(builder):
    messages = [ChatMessage("user", (IMAGE, TextPart("Describe this image.")))]
    assert builder.render(messages) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_image_outside_user_message_is_refused():
    with pytest.raises(BadRequestError, match="only in user and tool"):
        collect_images([ChatMessage("system", (IMAGE,)), ChatMessage("user", "hi")])
    assert collect_images([ChatMessage("user", (TextPart("a"), IMAGE, IMAGE))]) == [IMAGE, IMAGE]


def test_literal_image_pad_text_is_refused(builder):
    with pytest.raises(BadRequestError, match="1 image placeholder tokens but 0 image parts"):
        builder.tokenize([ChatMessage("user", "sneaky <|image_pad|> text")])


def test_text_only_model_refuses_images(builder):
    text_only = PromptBuilder(builder.template, builder._encode, image_token_id=None)
    with pytest.raises(BadRequestError, match="text-only"):
        text_only.tokenize([ChatMessage("user", (IMAGE,))])


def test_template_lookup_order(tmp_path):
    with pytest.raises(ChatTemplateNotFoundError):
        load_chat_template_source(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert load_chat_template_source(tmp_path) == "legacy"
    templates = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    config = {"chat_template": templates}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template_source(tmp_path) == "d"
    (tmp_path / "chat_template.jinja").write_text("file")
    assert load_chat_template_source(tmp_path) == "file"


def test_template_errors_become_bad_requests():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(BadRequestError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% if %}")


def test_special_tokens_and_tojson_are_available():
    template = ChatTemplate("{{ eos_token }}|{{ messages[0] | tojson }}", {"eos_token": "<e>"})
    assert template.render([{"role": "user", "content": "<b>é"}]) == (
        '<e>|{"role": "user", "content": "<b>é"}'
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather by city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"function": {"parameters": {"type": "object"}, "name": "ünïcode_tool"}, "type": "function"},
]
TOOL_CALLS = (
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "call_2", "type": "function", "function": {"name": "ünïcode_tool", "arguments": "{}"}},
)
TOOL_TURNS = {
    "tools_first_turn": [ChatMessage("system", "Use tools."), ChatMessage("user", "Weather?")],
    "tool_results": [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "Checking.", tool_calls=TOOL_CALLS),
        ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1"),
        ChatMessage("tool", (TextPart("done"), IMAGE), tool_call_id="call_2"),
        ChatMessage("assistant", None, tool_calls=TOOL_CALLS[:1]),
        ChatMessage("tool", "again", tool_call_id="call_1", name="get_weather"),
    ],
}


@pytest.mark.parametrize("name", sorted(TOOL_TURNS))
def test_tools_and_tool_turns_render_like_transformers(name, builder, hf_tokenizer):
    from services.language.frontend.prompt import RenderOptions

    messages = TOOL_TURNS[name]
    options = RenderOptions(tools=tuple(TOOLS), template_kwargs={"add_vision_id": True})
    hf_messages = _hf_messages(messages)
    kwargs = dict(tools=TOOLS, add_generation_prompt=True, add_vision_id=True)
    expected = hf_tokenizer.apply_chat_template(hf_messages, tokenize=False, **kwargs)
    assert builder.render(messages, options) == expected
    assert "<tools>" in expected
    if name == "tool_results":
        assert "Picture 1: " in expected and expected.count("<tool_response>") == 3
    ids = hf_tokenizer.apply_chat_template(hf_messages, tokenize=True, return_dict=False, **kwargs)
    assert builder.tokenize(messages, options) == list(ids)
