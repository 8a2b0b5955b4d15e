"""Video: decoding, sampling and preprocessing against transformers' Qwen3-VL video processor
(run in a subprocess with torchvision, see scripts/testkit/video_oracle.py), the bounds on bad
and long clips, and the unified model's logits with video against transformers' model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.testkit.clips import audio_only, make_clip, make_plain_clip, no_frames
from shared.model.loader import load_vl_model
from shared.model.video import (
    VideoProcessorConfig,
    apply_sampling,
    group_timestamps,
    preprocess_video,
    sample_indices,
)
from shared.model.video_decode import VideoLimits, decode_frames, load_video, probe
from shared.wire.images import VideoSampling
from tests.model.helpers import images_inputs
from tests.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID

REPO = Path(__file__).resolve().parents[2]
SIZE = {"shortest_edge": 4096, "longest_edge": 96 * 32 * 32}

# (codec, frames, width, height, clip fps, processor kwargs): odd sizes, odd sampled frame
# counts, an fps above the clip's own, resizing up and down, the per-frame cap on and off
CASES = [
    ("libvpx-vp9", 13, 95, 61, 6.0, {"fps": 4}),
    ("libx264", 13, 96, 62, 6.0, {"num_frames": 7, "cap_pixels_per_frame": True}),
    ("libx264", 9, 48, 30, 3.0, {"fps": 10}),
    ("gif", 11, 41, 77, 8.0, {"fps": 2, "cap_pixels_per_frame": False}),
    ("libx264", 40, 320, 180, 8.0, {"fps": 2, "cap_pixels_per_frame": True}),
    ("libx264", 40, 320, 180, 8.0, {"num_frames": 5}),
]


def _config(kwargs: dict) -> tuple[VideoProcessorConfig, VideoSampling]:
    sampling = VideoSampling(
        fps=kwargs.get("fps"),
        num_frames=kwargs.get("num_frames"),
        cap_pixels_per_frame=kwargs.get("cap_pixels_per_frame"),
    )
    base = VideoProcessorConfig(min_pixels=SIZE["shortest_edge"], max_pixels=SIZE["longest_edge"])
    return apply_sampling(base, sampling), sampling


def run_oracle(cases: list[dict], tmp: Path) -> None:
    """transformers' outputs for `cases` into `tmp` (see video_oracle.py)."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, "-m", "scripts.testkit.video_oracle", str(tmp / "cases.json"), str(tmp)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def oracle():
    """Per case: our clip, its full decode, and transformers' pixels, grid and indices."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cases, clips = Path(tmp), [], []
        for i, (codec, n, w, h, fps, kwargs) in enumerate(CASES):
            data = make_clip(n, w, h, fps, codec)
            meta = probe(data)
            frames, _ = decode_frames(data, range(meta.num_frames))
            np.save(tmp / f"clip{i}.npy", frames)
            cases.append(
                {
                    "frames": str(tmp / f"clip{i}.npy"),
                    "video_fps": meta.fps,
                    "kwargs": {**kwargs, "size": SIZE},
                    "prompt": None,
                }
            )
            clips.append((data, meta, frames))
        run_oracle(cases, tmp)
        yield [
            (*clips[i], *(np.load(tmp / f"{i}_{k}.npy") for k in ("pixels", "grid", "indices")))
            for i in range(len(CASES))
        ]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[5]}" for c in CASES])
def test_pixels_grid_and_frames_match_transformers(oracle, case):
    data, meta, frames, hf_pixels, hf_grid, hf_indices = oracle[case]
    cfg, sampling = _config(CASES[case][5])
    indices = sample_indices(meta.num_frames, meta.fps, cfg, sampling.num_frames)
    assert indices.tolist() == hf_indices.tolist()
    pixels, grid = preprocess_video(frames[indices], cfg)
    assert [list(grid)] == hf_grid.tolist()
    assert np.abs(pixels.numpy() - hf_pixels).max() <= 1e-6
    # The service's path (only the sampled frames decoded) gives the same
    clip = load_video(data, (), sampling, cfg)
    assert clip.grid_thw == grid and torch.equal(clip.pixel_values, pixels)
    assert clip.timestamps == tuple(group_timestamps(indices, meta.fps))


def test_decoded_frames_match_transformers_pyav_reader():
    from transformers.video_utils import read_video_pyav

    for codec in ("libx264", "gif", "libvpx-vp9"):
        data = make_clip(20, 64, 48, 10.0, codec)
        wanted = np.array([0, 3, 7, 8, 19])
        ours, _ = decode_frames(data, wanted)
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(data)
            f.flush()
            theirs, _ = read_video_pyav(f.name, lambda metadata, w=wanted, **kw: w)
        assert np.array_equal(ours, theirs), codec


def test_seeking_gives_the_frames_of_decoding_front_to_back():
    data = make_clip(300, 64, 48, 30.0, "libx264", gop=25)
    wanted = [0, 1, 90, 150, 151, 299]
    front, _ = decode_frames(data, wanted, VideoLimits(seek_gap=10**6))
    seeking, _ = decode_frames(data, wanted, VideoLimits(seek_gap=8))
    assert np.array_equal(front, seeking)


def test_timestamps_are_the_mean_time_of_each_frame_pair():
    assert group_timestamps([0, 2, 4, 7, 9, 11], 4.0) == [0.25, 1.375, 2.5]
    assert group_timestamps([0, 5, 9], 2.0) == [1.25, 4.5]  # an odd last group repeats its frame


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a video " * 100)
    return buf.getvalue()


BAD = {
    "truncated": lambda: make_clip(13, 96, 62, 6.0)[:1500],
    "audio only": audio_only,
    "zero frames": no_frames,
    "1x1 frames": lambda: make_clip(4, 1, 1, 4.0, "gif"),
    "8k frames": lambda: make_plain_clip(0.1, 7680, 4320, 20.0),
    "one hour": lambda: make_plain_clip(3600, 64, 64, 1 / 60),
    "zip renamed .mp4": _zip,
    "empty": lambda: b"",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_videos_are_refused_with_a_reason(name):
    from shared.model.video import VideoError

    with pytest.raises(VideoError) as err:
        load_video(BAD[name](), (), VideoSampling(), VideoProcessorConfig())
    assert str(err.value)


def test_a_minute_of_1080p_is_sampled_within_its_limits_and_time():
    data = make_plain_clip(60, 1920, 1080, 24.0)
    cfg = VideoProcessorConfig(min_pixels=4096, max_pixels=24576 * 32 * 32)  # the release's size
    start = time.monotonic()
    clip = load_video(data, (), VideoSampling(), cfg, VideoLimits(decode_timeout_s=60))
    took = time.monotonic() - start
    assert clip.meta.duration_s == 60 and len(clip.timestamps) == 60  # 120 frames at 2 fps
    t, h, w = clip.grid_thw
    assert 2 * t * h * w * 16 * 16 <= cfg.max_pixels
    assert took < 60, f"{took:.1f} s"
    with pytest.raises(ValueError, match="decoding took over 0.05 s"):
        load_video(data, (), VideoSampling(), cfg, VideoLimits(decode_timeout_s=0.05))


# ------------------------------------------------------------------ logits against transformers


def _video_prompt(grid, timestamps, text=(5, 7)) -> list[int]:
    """text, then per group: a timestamp-like text run, vision start, pads, vision end; text."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 290, (text[0],), generator=gen).tolist()
    t, h, w = grid
    for _ in timestamps:
        ids += torch.randint(0, 290, (3,), generator=gen).tolist()
        ids += [VISION_START_ID] + [VIDEO_TOKEN_ID] * (h * w // 4) + [VISION_END_ID]
    return ids + torch.randint(0, 290, (text[1],), generator=gen).tolist()


def _hf_logits(hf, ids, **media):
    types = (ids == IMAGE_TOKEN_ID).long() + 2 * (ids == VIDEO_TOKEN_ID).long()
    with torch.no_grad():
        return hf(input_ids=ids[None], mm_token_type_ids=types[None], **media).logits[0]


@pytest.mark.parametrize(
    "image_first", [None, True, False], ids=["video", "image+video", "video+image"]
)
def test_logits_with_video_match_transformers(tiny_vl_dir, tiny_vl, image_first):
    ours = load_vl_model(tiny_vl_dir)
    cfg = VideoProcessorConfig(min_pixels=4096, max_pixels=32 * 32 * 32 * 4)
    clip = load_video(make_clip(9, 80, 48, 6.0), (), VideoSampling(fps=3.0), cfg)
    assert clip.grid_thw[0] >= 2
    ids = _video_prompt(clip.grid_thw, clip.timestamps)
    media = dict(
        pixel_values_videos=clip.pixel_values, video_grid_thw=torch.tensor([clip.grid_thw])
    )
    if image_first is not None:
        pv, grid = images_inputs([(64, 96)])
        image = [VISION_START_ID] + [IMAGE_TOKEN_ID] * (grid[0].prod().item() // 4)
        image += [VISION_END_ID, 11, 12]
        ids = image + ids if image_first else ids + image
        media.update(pixel_values=pv, image_grid_thw=grid)
    ids = torch.tensor(ids)
    with torch.no_grad():
        got = ours(ids, **media)
    want = _hf_logits(tiny_vl[1], ids, **media)
    assert (got - want).abs().max().item() <= 1e-4
