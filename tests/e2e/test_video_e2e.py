"""Videos through encode + language processes: the served prompt and greedy answer equal the
project's in-process path (the vision tower and the unified model in this process, no engine),
over both transports and both APIs; bad clips get a 4xx and the service serves on."""

from __future__ import annotations

import base64
import io
from functools import cache

import grpc
import httpx
import pytest
import torch
from PIL import Image

from proto.splitvl.language.v1 import language_pb2 as pb
from proto.splitvl.language.v1 import language_pb2_grpc as pb_grpc
from scripts.testkit.clips import make_clip
from shared.model.loader import load_vl_model
from shared.model.video import load_video_processor_config
from shared.model.video_decode import decode_frames, load_video, probe
from shared.wire.images import VideoSampling
from tests.e2e.conftest import API_KEY
from tests.model.test_video import BAD

CLIP = make_clip(12, 96, 64, 4.0)
QUESTION = "Which colour appears first?"


def _video_messages(url: str) -> list[dict]:
    video = {"type": "video_url", "video_url": {"url": url}}
    return [{"role": "user", "content": [video, {"type": "text", "text": QUESTION}]}]


def _data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def _ask(cluster, model, data: bytes = CLIP):
    response = cluster.client().chat.completions.create(
        model=cluster.model_name, messages=_video_messages(_data_url(data)), **model.greedy()
    )
    return response.model_extra["prompt_token_ids"], response.choices[0].model_extra["token_ids"]


@cache
def _in_process(model_dir, prompt_ids: tuple[int, ...], max_tokens: int, stop: int) -> list[int]:
    """Greedy tokens of the unified model over the whole sequence each step (no engine, no
    services): the clip decoded and encoded in this process."""
    model = load_vl_model(model_dir).eval()
    cfg = load_video_processor_config(model_dir)
    clip = load_video(CLIP, (), VideoSampling(), cfg)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(
                torch.tensor(ids),
                pixel_values_videos=clip.pixel_values,
                video_grid_thw=torch.tensor([clip.grid_thw]),
            )
            token = int(logits[-1].argmax())
            out.append(token)
            ids.append(token)
            if token == stop:
                break
    return out


def _check(cluster, e2e_model, prompt_ids, token_ids):
    tokenized = httpx.post(
        f"{cluster.base_url}/tokenize",
        json={"model": cluster.model_name, "messages": _video_messages(_data_url(CLIP))},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ).json()["tokens"]
    assert prompt_ids == tokenized  # what the encode service did = what the headers predict
    greedy = e2e_model.greedy()
    stop = -1 if "ignore_eos" in greedy["extra_body"] else _im_end(e2e_model.path)
    want = _in_process(e2e_model.path, tuple(prompt_ids), greedy["max_tokens"], stop)
    assert token_ids == want


def _im_end(model_dir) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("<|im_end|>")


@pytest.mark.parametrize("transport", ["grpc", "nccl", "ipc"])
def test_video_answers_equal_the_in_process_path(request, e2e_model, transport):
    cluster = request.getfixturevalue(f"{transport}_cluster")
    prompt_ids, token_ids = _ask(cluster, e2e_model)
    _check(cluster, e2e_model, prompt_ids, token_ids)


def test_grpc_generate_takes_a_clip_or_its_frames(grpc_cluster, e2e_model):
    """Frames given as PNGs of the decoded clip at its rate are the same video."""
    meta = probe(CLIP)
    frames, _ = decode_frames(CLIP, range(meta.num_frames))
    pngs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "PNG")
        pngs.append(buf.getvalue())
    answers = []
    with grpc.insecure_channel(grpc_cluster.grpc_address) as channel:
        stub = pb_grpc.LanguageServiceStub(channel)
        for video in (pb.Video(data=CLIP), pb.Video(frames=pb.Frames(images=pngs, fps=meta.fps))):
            content = [pb.ContentPart(video=video), pb.ContentPart(text=QUESTION)]
            request = pb.GenerateRequest(
                messages=[pb.Message(role="user", content=content)],
                sampling=pb.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            )
            replies = stub.Generate(request, metadata=[("authorization", f"Bearer {API_KEY}")])
            answers.append([t for reply in replies for t in reply.token_ids])
    assert answers[0] == answers[1] and len(answers[0]) == 8


@pytest.mark.parametrize("name", list(BAD))
def test_bad_videos_get_a_4xx_and_the_service_serves_on(grpc_cluster, e2e_model, name):
    reply = httpx.post(
        f"{grpc_cluster.base_url}/v1/chat/completions",
        json={
            "model": grpc_cluster.model_name,
            "messages": _video_messages(_data_url(BAD[name]())),
            "max_tokens": 4,
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["message"]
    prompt_ids, token_ids = _ask(grpc_cluster, e2e_model)
    assert token_ids
