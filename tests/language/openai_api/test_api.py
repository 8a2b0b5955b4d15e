"""The OpenAI-compatible HTTP API over a real engine on the tiny checkpoint, via the openai client.

The server runs in this process on a free port (real sockets, real engine thread); images are
encoded by the vision tower in-process, since these tests are about the API, not the transport.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from services.language.engine import EngineConfig
from tests.e2e.inprocess import language_server
from tests.e2e.support import (
    InProcessEncoder,
    data_url,
    greedy_disagreements,
    hf_image_inputs,
    png_bytes,
    read_metrics,
    servable_copy,
    wait_for_idle_kv,
)
from tests.tiny import IMAGE_TOKEN_ID

MODEL = "tiny"
MAX_MODEL_LEN = 4096
LONG = 4000
ABORTED = 'splitvl_language_requests_finished_total{finish_reason="abort"}'
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def served_dir(tiny_vl, tmp_path_factory):
    return servable_copy(tiny_vl[0], tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def hf_model(tiny_vl):
    return tiny_vl[1]


@pytest.fixture(scope="module")
def hf_tokenizer(served_dir):
    return PreTrainedTokenizerFast.from_pretrained(served_dir)


@pytest.fixture(scope="module")
def server(served_dir):
    # A long context, so a long generation is still running when a test aborts it
    engine = EngineConfig(kv_cache_memory=32 * 2**20, max_model_len=MAX_MODEL_LEN)
    encoder = InProcessEncoder(served_dir)
    with language_server(served_dir, encoder, engine, model_name=MODEL) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    )


def image_message(image: bytes, text: str) -> list[dict]:
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": text},
    ]
    return [{"role": "user", "content": parts}]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(f"{server.base_url}/health", timeout=10).json() == {"status": "ok"}
    metrics = read_metrics(server.base_url)
    assert metrics["splitvl_language_kv_cache_total_blocks"] > 0
    assert "splitvl_language_prefix_cache_hit_ratio" in metrics


def test_text_chat_greedy_matches_transformers(client, hf_model, hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there!"},
    ]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, **GREEDY
    )
    choice = response.choices[0]
    prompt_ids = response.model_extra["prompt_token_ids"]
    token_ids = choice.model_extra["token_ids"]
    expected_prompt = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt_ids == list(expected_prompt)
    assert len(token_ids) == 12 and choice.finish_reason == "length"
    assert greedy_disagreements(hf_model, prompt_ids, token_ids, IMAGE_TOKEN_ID) == []
    assert choice.message.content == hf_tokenizer.decode(token_ids, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 12


def test_image_chat_streamed_and_whole_agree_with_transformers(
    client, hf_model, hf_tokenizer, served_dir
):
    image = png_bytes(64, 48, seed=1)
    messages = image_message(image, "What shape is this?")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    prompt_ids = whole.model_extra["prompt_token_ids"]
    token_ids = whole.choices[0].model_extra["token_ids"]
    pixel_values, grid = hf_image_inputs(served_dir, [image])
    num_image_tokens = int(grid[0].prod()) // 4
    assert prompt_ids.count(IMAGE_TOKEN_ID) == num_image_tokens
    assert whole.usage.prompt_tokens == len(prompt_ids)  # image tokens counted
    problems = greedy_disagreements(
        hf_model, prompt_ids, token_ids, IMAGE_TOKEN_ID, pixel_values, grid
    )
    assert problems == []

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_ids = [
        t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])
    ]
    # The streamed request reuses the first one's cached prefix blocks; both must be greedy
    assert text == hf_tokenizer.decode(streamed_ids, skip_special_tokens=True)
    assert (
        greedy_disagreements(hf_model, prompt_ids, streamed_ids, IMAGE_TOKEN_ID, pixel_values, grid)
        == []
    )
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == 10


def test_two_images_in_one_message(client, hf_model, served_dir):
    images = [png_bytes(32, 64, seed=2), png_bytes(96, 32, seed=3)]
    parts = [{"type": "text", "text": "Compare"}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=6, **GREEDY
    )
    pixel_values, grid = hf_image_inputs(served_dir, images)
    prompt_ids = response.model_extra["prompt_token_ids"]
    assert prompt_ids.count(IMAGE_TOKEN_ID) == sum(int(g.prod()) // 4 for g in grid)
    token_ids = response.choices[0].model_extra["token_ids"]
    assert (
        greedy_disagreements(hf_model, prompt_ids, token_ids, IMAGE_TOKEN_ID, pixel_values, grid)
        == []
    )


def test_n_choices_logprobs_and_seeds(client):
    messages = [{"role": "user", "content": "Count with me"}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, n=2, logprobs=True, top_logprobs=3, **GREEDY
    )
    first, second = response.choices
    assert first.message.content == second.message.content
    assert response.usage.completion_tokens == 10
    for entry in first.logprobs.content:
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top one
    seeded = dict(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=1.0,
        seed=7,
        extra_body={"return_token_ids": True},
    )
    a = client.chat.completions.create(**seeded).choices[0].model_extra["token_ids"]
    b = client.chat.completions.create(**seeded).choices[0].model_extra["token_ids"]
    assert a == b


def test_stop_string_ends_with_finish_reason_stop(client):
    messages = [{"role": "user", "content": "Say something long"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **GREEDY)
    text = full.choices[0].message.content
    assert len(text) >= 6, "the greedy output is too short to pick a stop string from"
    stop = text[3:5]
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, stop=[stop], **GREEDY
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_plain_completions(client, hf_model, hf_tokenizer):
    response = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, **GREEDY)
    prompt_ids = response.model_extra["prompt_token_ids"]
    assert prompt_ids == hf_tokenizer.encode("Once upon", add_special_tokens=False)
    token_ids = response.choices[0].model_extra["token_ids"]
    assert greedy_disagreements(hf_model, prompt_ids, token_ids, IMAGE_TOKEN_ID) == []
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == response.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=6, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text


def _start_stream(server, max_tokens: int) -> tuple[httpx.Client, httpx.Response]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    http = httpx.Client(timeout=30)
    response = http.send(
        http.build_request("POST", f"{server.base_url}/v1/chat/completions", json=body),
        stream=True,
    )
    return http, response


def test_aborting_a_stream_frees_its_kv_blocks(server):
    wait_for_idle_kv(server.base_url)
    aborted_before = read_metrics(server.base_url, labeled=True).get(ABORTED, 0)
    http, response = _start_stream(server, max_tokens=LONG)
    try:
        # Keep the line iterator referenced: dropping it makes httpx close the connection
        lines = response.iter_lines()
        received = []
        while len(received) < 4:
            line = next(lines)
            if line.startswith("data: {"):
                received.append(json.loads(line[6:]))
        busy = read_metrics(server.base_url)
        assert busy["splitvl_language_num_requests_running"] == 1
        assert (
            busy["splitvl_language_kv_cache_free_blocks"]
            < busy["splitvl_language_kv_cache_total_blocks"]
        )
    finally:
        response.close()
        http.close()
    wait_for_idle_kv(server.base_url)
    assert read_metrics(server.base_url, labeled=True)[ABORTED] == aborted_before + 1


def test_disconnecting_a_non_streamed_request_aborts_it(server):
    wait_for_idle_kv(server.base_url)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": LONG,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=0.3)
    wait_for_idle_kv(server.base_url)
    # Still serving afterwards
    ok = httpx.post(
        f"{server.base_url}/v1/chat/completions", timeout=30, json={**body, "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_metrics_record_latencies_and_token_counts(server, client):
    before = read_metrics(server.base_url)
    image = png_bytes(64, 64, seed=7)
    response = client.chat.completions.create(
        model=MODEL, messages=image_message(image, "Count"), max_tokens=5, **GREEDY
    )
    after = read_metrics(server.base_url)

    def grew(name: str) -> float:
        return after[f"splitvl_language_{name}"] - before.get(f"splitvl_language_{name}", 0)

    prompt_ids = response.model_extra["prompt_token_ids"]
    assert grew("time_to_first_token_seconds_count") == 1
    assert grew("e2e_request_latency_seconds_count") == 1
    assert grew("encode_latency_seconds_count") == 1
    assert grew("inter_token_latency_seconds_count") == 4  # gaps between 5 tokens
    assert grew("generation_tokens_total") == 5
    assert grew("prompt_tokens_total") == len(prompt_ids)
    assert grew("image_tokens_total") == prompt_ids.count(IMAGE_TOKEN_ID)
    assert 0.0 <= after["splitvl_language_prefix_cache_hit_ratio"] <= 1.0


def test_streamed_choices_are_kept_apart(client):
    messages = [{"role": "user", "content": "Two answers please"}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, n=2, stream=True, **GREEDY
    )
    ids: dict[int, list[int]] = {0: [], 1: []}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            ids[choice.index] += choice.model_extra.get("token_ids", [])
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "length", 1: "length"}
    assert [len(ids[0]), len(ids[1])] == [6, 6]
    assert ids[0] == ids[1]  # both greedy
