"""The official openai client against encode + language processes (inline gRPC transport)."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest

from proto.splitvl.language.v1 import language_pb2 as pb
from proto.splitvl.language.v1 import language_pb2_grpc as pb_grpc
from scripts.testkit.launch import wait_grpc_serving
from tests.e2e.checks import ask, ask_streamed, chat_messages, check_answer
from tests.e2e.conftest import API_KEY
from tests.e2e.support import read_metrics, wait_for_idle_kv

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Thousands of tokens under any tokenizer (the context is 2048)
TOO_LONG = " ".join(str(i * 7919 % 100003) for i in range(3000))


def test_models_list_and_health(grpc_cluster):
    client = grpc_cluster.client()
    assert [m.id for m in client.models.list().data] == [grpc_cluster.model_name]
    assert httpx.get(f"{grpc_cluster.base_url}/health", timeout=10).status_code == 200
    service = "splitvl.language.v1.LanguageService"
    wait_grpc_serving(grpc_cluster.grpc_address, timeout_s=10, service=service)


def test_image_chat_matches_transformers(grpc_cluster, e2e_model, reference):
    for image, question in e2e_model.image_cases(2):
        response, prompt_ids, token_ids = ask(grpc_cluster, e2e_model, question, image)
        check_answer(reference, e2e_model, question, image, prompt_ids, token_ids)
        assert response.usage.prompt_tokens == len(prompt_ids)  # image tokens included
        text, streamed_ids, reason, usage = ask_streamed(grpc_cluster, e2e_model, question, image)
        assert reason == response.choices[0].finish_reason
        assert usage.prompt_tokens == response.usage.prompt_tokens
        assert usage.completion_tokens == len(streamed_ids)
        if streamed_ids == token_ids:
            assert text == response.choices[0].message.content
        else:  # only a near-tie on random weights may flip; both must be transformers-greedy
            check_answer(reference, e2e_model, question, image, prompt_ids, streamed_ids)


def test_text_only_chat_matches_transformers(grpc_cluster, e2e_model, reference):
    question = "Hello! What can you do?"
    response, prompt_ids, token_ids = ask(grpc_cluster, e2e_model, question)
    check_answer(reference, e2e_model, question, None, prompt_ids, token_ids)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_openai_errors_then_service_continues(grpc_cluster, e2e_model):
    client = grpc_cluster.client()
    url = f"{grpc_cluster.base_url}/v1/chat/completions"
    bad = {
        401: dict(headers={"Authorization": "Bearer wrong"}, json={"model": "x"}),
        400: dict(headers={**AUTH, "Content-Type": "application/json"}, content=b"{oops"),
        404: dict(headers=AUTH, json={"model": "nope", "messages": chat_messages("hi")}),
    }
    for status, kwargs in bad.items():
        response = httpx.post(url, timeout=30, **kwargs)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=grpc_cluster.model_name, messages=chat_messages(TOO_LONG), max_tokens=4
        )
    image, question = e2e_model.image_cases(1)[0]
    response, _, _ = ask(grpc_cluster, e2e_model, question, image)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_abort_midway_frees_kv_blocks(grpc_cluster, e2e_model):
    base = grpc_cluster.base_url
    wait_for_idle_kv(base)
    image, question = e2e_model.image_cases(1, seed=5)[0]
    body = {
        "model": grpc_cluster.model_name,
        "messages": chat_messages(question, image),
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60, headers=AUTH) as http:
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            lines, chunks = response.iter_lines(), 0
            while chunks < 3:
                chunks += next(lines).startswith("data: {")
            busy = read_metrics(base)
            assert busy["splitvl_language_num_requests_running"] == 1
            used = (
                busy["splitvl_language_kv_cache_total_blocks"]
                - busy["splitvl_language_kv_cache_free_blocks"]
            )
            assert used > 0
    wait_for_idle_kv(base)  # every block back in the free pool, as /metrics shows


def _grpc_generate(cluster, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        stub = pb_grpc.LanguageServiceStub(channel)
        metadata = (("authorization", f"Bearer {cluster.api_key}"),)
        return list(stub.Generate(request, metadata=metadata, timeout=120))


def test_grpc_generate_returns_the_same_tokens_as_http(grpc_cluster, e2e_model):
    image, question = e2e_model.image_cases(1, seed=9)[0]
    _, prompt_ids, http_ids = ask(grpc_cluster, e2e_model, question, image)
    greedy = e2e_model.greedy()
    sampling = pb.SamplingParams(
        temperature=0,
        max_tokens=greedy["max_tokens"],
        ignore_eos=greedy["extra_body"].get("ignore_eos", False),
    )
    message = pb.Message(
        role="user", content=[pb.ContentPart(image=image), pb.ContentPart(text=question)]
    )
    responses = _grpc_generate(
        grpc_cluster,
        pb.GenerateRequest(model=grpc_cluster.model_name, messages=[message], sampling=sampling),
    )
    grpc_ids = [t for r in responses for t in r.token_ids]
    assert grpc_ids == http_ids
    last = responses[-1]
    assert last.finished and last.finish_reason in ("stop", "length")
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert all(not r.finished for r in responses[:-1])


def test_grpc_errors_use_status_codes(grpc_cluster):
    message = pb.Message(role="user", content=[pb.ContentPart(image=b"not an image")])
    with pytest.raises(grpc.RpcError) as info:
        _grpc_generate(grpc_cluster, pb.GenerateRequest(messages=[message]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        _grpc_generate(grpc_cluster, pb.GenerateRequest(model="nope", messages=[message]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(grpc_cluster.grpc_address) as channel:
        stub = pb_grpc.LanguageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(messages=[message]), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert json.loads(httpx.get(f"{grpc_cluster.base_url}/health", timeout=10).text)
