"""Image controls and the tokenizer routes through the HTTP API on the shapes model: per-request
max_pixels counts tokens as transformers' processor does, --limit-mm-per-prompt refuses before
encoding, file:// stays inside --allowed-local-media-path, /tokenize equals usage.prompt_tokens."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.language.frontend.image_policy import ImagePolicy
from services.language.frontend.images import ImageFetchConfig
from services.language.frontend.pipeline import FrontendOptions
from services.language.parsers.tool_calls import ToolConfig
from tests.e2e.support import data_url, png_bytes
from tests.language.serving import SHAPES_VL, PixelLimitEncoder, chat_server

MODEL = "shapes-vl"
PAD = 399  # <|image_pad|> in the shapes tokenizer
IMAGE = png_bytes(200, 160, seed=2)  # larger than max_pixels: every limit changes its size
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "images").mkdir()
    (root / "images" / "shape.png").write_bytes(IMAGE)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(IMAGE)
    (root / "images" / "link.png").symlink_to(outside / "secret.png")
    return root


@pytest.fixture(scope="module")
def encoder():
    return PixelLimitEncoder(SHAPES_VL)


@pytest.fixture(scope="module")
def server(media_dir, encoder):
    options = FrontendOptions(tools=ToolConfig("qwen3", True), images=ImagePolicy(None, 2))
    fetch = ImageFetchConfig(allowed_local_media_path=str(media_dir))
    with chat_server(SHAPES_VL, encoder, options, fetch=fetch) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    )


def image_messages(*urls: str, text: str = "Describe the image.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def hf_num_tokens(max_pixels: int | None) -> int:
    import io

    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(SHAPES_VL, use_fast=False)
    size = {
        "shortest_edge": processor.size["shortest_edge"],
        "longest_edge": max_pixels or processor.size["longest_edge"],
    }
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    grid = processor(images=[image], size=size, return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.merge_size**2


def chat_ids(client, messages, **extra) -> list[int]:
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )
    ids = response.model_extra["prompt_token_ids"]
    assert response.usage.prompt_tokens == len(ids)
    return ids


def test_max_pixels_counts_tokens_as_transformers(client, encoder):
    default = chat_ids(client, image_messages(data_url(IMAGE)))
    assert default.count(PAD) == hf_num_tokens(None) == 12
    lowered = chat_ids(
        client, image_messages(data_url(IMAGE)), mm_processor_kwargs={"max_pixels": 12000}
    )
    assert lowered.count(PAD) == hf_num_tokens(12000) == 9
    assert encoder.refs[-1].max_pixels == 12000 and encoder.refs[-1].min_pixels is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_pixels": 10**6}, "over this server's limit of 16384"),
        ({"min_pixels": 15000, "max_pixels": 10000}, "greater than max_pixels"),
        ({"max_pixels": -5}, "positive integer"),
        ({"do_resize": False}, "not supported"),
    ],
)
def test_bad_pixel_limits_are_400s(server, kwargs, fragment):
    body = {
        "model": MODEL,
        "messages": image_messages(data_url(IMAGE)),
        "max_tokens": 2,
        "mm_processor_kwargs": kwargs,
    }
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_image_limit_refuses_before_encoding(server, encoder):
    calls = encoder.num_calls
    body = {"model": MODEL, "max_tokens": 2, "messages": image_messages(*[data_url(IMAGE)] * 3)}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert "at most 2 per prompt" in response.json()["error"]["message"]
    assert encoder.num_calls == calls
    assert (
        post(server, "/tokenize", {"model": MODEL, "messages": body["messages"]}).status_code == 400
    )


def test_local_files_only_inside_the_allowed_directory(client, server, media_dir):
    inside = (media_dir / "images" / "shape.png").as_uri()
    assert chat_ids(client, image_messages(inside)).count(PAD) == 12
    for url in [
        f"file://{media_dir}/images/../../outside/secret.png",
        (media_dir / "images" / "link.png").as_uri(),  # a link to a file outside
        f"file://{media_dir}/images/missing.png",
        "file://otherhost/x.png",
    ]:
        body = {"model": MODEL, "max_tokens": 2, "messages": image_messages(url)}
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 400, url


def test_tokenize_counts_equal_prompt_tokens(client, server):
    messages = image_messages(data_url(IMAGE), data_url(png_bytes(90, 300, seed=1)))
    for extra in ({}, {"mm_processor_kwargs": {"max_pixels": 10000}}, {"tools": TOOLS}):
        ids = chat_ids(client, messages, **extra)
        tokenized = post(server, "/tokenize", {"model": MODEL, "messages": messages, **extra})
        assert tokenized.status_code == 200, tokenized.text
        body = tokenized.json()
        assert body["count"] == len(ids) and body["tokens"] == ids
        assert body["max_model_len"] == 2048
    text = post(server, "/tokenize", {"prompt": "a red circle", "return_token_strs": True}).json()
    assert text["count"] == len(text["tokens"]) == len(text["token_strs"])
    back = post(server, "/detokenize", {"model": MODEL, "tokens": text["tokens"]}).json()
    assert back == {"prompt": "a red circle"}
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert httpx.get(f"{server.base_url}/version", timeout=10).json()["version"]
