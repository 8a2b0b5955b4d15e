"""A chat's prompt token ids with videos (and an image) equal transformers' Qwen3-VL processor
and chat template on the shipped model: per temporal group its time, then its pads. Counted by
the server's /tokenize, which reads the clips' headers only (the served path's counts are held
equal to these in tests/e2e/test_video_e2e.py)."""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.testkit.clips import make_clip
from shared.model.video_decode import decode_frames, probe
from tests.e2e.inprocess import language_server
from tests.model.test_video import run_oracle

MODEL = Path(__file__).resolve().parents[3] / "models" / "shapes-vl"

# (clips as (codec, frames, width, height, fps), mm_processor_kwargs, with an image)
CASES = {
    "odd-size-default-sampling": ([("libvpx-vp9", 13, 95, 61, 6.0)], {}, False),
    "odd-frame-count": ([("libx264", 13, 96, 62, 6.0)], {"num_frames": 7}, False),
    "fps-above-the-clips": ([("libx264", 9, 48, 30, 3.0)], {"fps": 10}, False),
    "two-videos-and-an-image-capped": (
        [("libx264", 16, 64, 64, 8.0), ("gif", 7, 40, 56, 5.0)],
        {"fps": 4, "cap_pixels_per_frame": True},
        True,
    ),
}


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _messages(num_videos: int, image: bool, ours: list[str] | None):
    """The conversation as transformers' template takes it (ours=None) or as an API body."""

    def video(i):
        if ours is None:
            return {"type": "video"}
        return {"type": "video_url", "video_url": {"url": ours[i]}}

    first = [video(0), {"type": "text", "text": "What moves?"}]
    messages = [{"role": "user", "content": first}]
    if num_videos > 1 or image:
        messages.append({"role": "assistant", "content": "A bar."})
        later = [video(i) for i in range(1, num_videos)]
        if image:
            later.append({"type": "image"} if ours is None else ours[-1])
        messages.append({"role": "user", "content": [*later, {"type": "text", "text": "And?"}]})
    return messages


@pytest.fixture(scope="module")
def expected():
    """transformers' input ids per case, and the clips."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cases, clips = Path(tmp), [], {}
        for name, (specs, kwargs, image) in CASES.items():
            datas, paths, rates = [], [], []
            for j, spec in enumerate(specs):
                codec, n, w, h, fps = spec
                data = make_clip(n, w, h, fps, codec)
                meta = probe(data)
                frames, _ = decode_frames(data, range(meta.num_frames))
                path = tmp / f"{name}-{j}.npy"
                np.save(path, frames)
                datas.append(data)
                paths.append(str(path))
                rates.append(meta.fps)
            prompt = {"model_dir": str(MODEL), "messages": _messages(len(specs), image, None)}
            if image:
                picture = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
                np.save(tmp / f"{name}-image.npy", picture)
                prompt["images"] = [str(tmp / f"{name}-image.npy")]
            oracle_kwargs = dict(kwargs)
            cases.append({"frames": paths, "video_fps": rates, "kwargs": oracle_kwargs})
            cases[-1]["prompt"] = prompt
            clips[name] = (datas, image)
        run_oracle(cases, tmp)
        yield {
            name: (clips[name], np.load(tmp / f"{i}_ids.npy").tolist())
            for i, name in enumerate(CASES)
        }


@pytest.fixture(scope="module")
def server():
    with language_server(MODEL, model_name="shapes-vl") as srv:
        yield srv


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_ids_with_videos_match_transformers(expected, server, name):
    (datas, image), want = expected[name]
    urls = [_data_url(data, "video/mp4") for data in datas]
    if image:
        buf = io.BytesIO()
        rng = np.random.default_rng(3)
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(buf, "PNG")
        urls.append(
            {"type": "image_url", "image_url": {"url": _data_url(buf.getvalue(), "image/png")}}
        )
    body = {"model": "shapes-vl", "messages": _messages(len(datas), image, urls)}
    if CASES[name][1]:
        body["mm_processor_kwargs"] = CASES[name][1]
    reply = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    got = reply.json()["tokens"]
    assert got == want, json.dumps({"got": got[:80], "want": want[:80]})
