"""Time to first token of image requests: overlap (the default) against --no-overlap, per
transport, at low load (one request at a time), the encode and language services pinned to
separate cores so that encoding and prefill really run side by side on a CPU.

A random checkpoint of `--shape` (its text model) with a vision tower of `--vision-depth` x
`--vision-hidden` is written once; each request holds N distinct random images of `--side`
pixels (new ones every time, so neither the encode cache nor the prefix cache helps), or one
generated clip with `--video`. The encode service runs one image per vision forward
(`--max-batch-patches` of one image), so a request's images finish one after another and the
overlap can prefill the first ones' tokens while the next encode: that is the deployment this
measures. Both language services (overlap and `--no-overlap`) run at once on the same core,
idle but for the request at hand, and the requests alternate between them. Prints, per image
count and transport, the median TTFT of both and their ratio.

What overlap can save depends on how encoding one image compares with prefilling its tokens. The
defaults (the medium text model, a vision tower of depth 4 and width 256, 448-pixel images) keep
the proportion of Qwen3-VL-30B-A3B, whose prefill of an image's tokens costs about 1.5x its vision
forward in FLOPs; the bench prints both proportions (`flops_per_image`).

    python -m bench.ttft [--images 1,4,8] [--transports grpc,ipc] [--repeats 5] [--video]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

TEMPLATE = Path(__file__).resolve().parents[1] / "scripts/shapes_vl/qwen3_vl_chat_template.jinja"


def write_checkpoint(path: Path, args: argparse.Namespace) -> None:
    from bench.common import shape_configs
    from scripts.testkit.checkpoints import preprocessor_config, vl_config, write_vl_checkpoint
    from scripts.testkit.tokenizers import save_tokenizer

    text, base, special = shape_configs(args.shape)
    vision = _vision(base, args.vision_depth, args.vision_hidden)
    side = args.side * args.side
    config = vl_config(text, vision, special, (12, 10, 10))
    write_vl_checkpoint(path, config, preprocessor_config(side, side))
    video = {"size": {"shortest_edge": 4096, "longest_edge": 8 * side}, "fps": 2, "min_frames": 4}
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    names |= {"start": "<|vision_start|>", "end": "<|vision_end|>"}
    tokens = {names[kind]: token for kind, token in special.items()}
    save_tokenizer(path, TEMPLATE.read_text(), special_ids=tokens, vocab_size=text["vocab_size"])


def flops_per_image(text: dict, vision: dict, side: int) -> tuple[float, float]:
    """(vision forward, language prefill) multiply-add FLOPs of one `side` x `side` image: the
    tower's projections, MLPs and attention over its patches, and the decoder's projections and
    active experts (top-k) over its merged tokens (attention among them is small beside those)."""
    patches = (side // vision["patch_size"]) ** 2
    h, inner = vision["hidden_size"], vision["intermediate_size"]
    per_patch = vision["depth"] * 2 * (4 * h * h + 2 * h * inner + 2 * patches * h)
    d, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head = text["head_dim"]
    attention = 2 * d * heads * head + 2 * d * kv * head
    experts = text["num_experts_per_tok"] * 3 * d * text["moe_intermediate_size"]
    per_token = text["num_hidden_layers"] * 2 * (attention + experts + d * text["num_experts"])
    tokens = patches // vision["spatial_merge_size"] ** 2
    return patches * per_patch, tokens * per_token


def _vision(base: dict, depth: int, hidden: int) -> dict:
    return dict(
        base,
        depth=depth,
        hidden_size=hidden,
        num_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[0, depth // 2],
    )


def print_balance(args: argparse.Namespace) -> None:
    """The prefill / vision FLOP proportion of one image here and in Qwen3-VL-30B-A3B."""
    from bench.common import shape_configs

    text, base, _ = shape_configs(args.shape)
    here = flops_per_image(text, _vision(base, args.vision_depth, args.vision_hidden), args.side)
    real = flops_per_image(*shape_configs("30b-a3b")[:2], args.side)
    print(
        f"one {args.side}px image: vision {here[0] / 1e9:.1f} GFLOP, prefill {here[1] / 1e9:.1f} "
        f"GFLOP (prefill/vision {here[1] / here[0]:.2f}; Qwen3-VL-30B-A3B "
        f"{real[1] / real[0]:.2f})",
        flush=True,
    )


def _png(rng: np.random.Generator, side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _clip(rng: np.random.Generator, side: int) -> str:
    from scripts.testkit.clips import encode_clip

    frames = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(16)]
    return "data:video/mp4;base64," + base64.b64encode(encode_clip(frames, 4.0)).decode()


def _parts(rng: np.random.Generator, count, side: int) -> list[dict]:
    """One request's media: `count` new images, or a new clip."""
    if count == "video":
        return [{"type": "video_url", "video_url": {"url": _clip(rng, side)}}]
    return [{"type": "image_url", "image_url": {"url": _png(rng, side)}} for _ in range(count)]


def ttft(base_url: str, parts: list[dict]) -> float:
    """Seconds from sending a streamed chat to its first content chunk."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}],
        "max_tokens": 2,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without content")


@contextmanager
def pinned(cores: set[int]):
    """Processes started inside inherit these cores."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _cores(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from scripts.testkit.launch import start_encode, start_language

    model = workdir / "model"
    if not (model / "config.json").is_file():
        print("writing the benchmark checkpoint ...", flush=True)
        write_checkpoint(model, args)
    patches = (args.side // 16) ** 2
    encode_args = ["--max-batch-patches", str(patches), "--log-level", "WARNING"]
    encode_args += ["--dtype", args.dtype]
    with pinned(_cores(args.encode_cores)):
        encode, address = start_encode(model, workdir, encode_args)
    rng = np.random.default_rng(0)
    counts = ["video"] if args.video else [int(n) for n in args.images.split(",")]
    medians: dict[tuple, float] = {}
    try:
        for transport in args.transports.split(","):
            # Both services up at once, requests alternating between them, so a machine that
            # speeds up or slows down during the run weighs on both alike.
            services = {}
            try:
                for overlap in (True, False):
                    flags = ["--encode", address, "--transport", transport, "--threads", "1"]
                    flags += ["--served-model-name", "bench", "--log-level", "WARNING"]
                    flags += ["--dtype", args.dtype]
                    flags += [] if overlap else ["--no-overlap"]
                    name = "language" if overlap else "language-no-overlap"
                    with pinned(_cores(args.language_cores)):
                        services[overlap] = start_language(model, workdir, flags, name=name)[:2]
                for count in counts:
                    times = {True: [], False: []}
                    for repeat in range(args.repeats + 1):  # the first is a warm-up
                        for overlap, (_, base_url) in services.items():
                            seconds = ttft(base_url, _parts(rng, count, args.side))
                            if repeat:
                                times[overlap].append(seconds)
                    for overlap, samples in times.items():
                        medians[(count, transport, overlap)] = statistics.median(samples)
                        print(
                            f"{count} x {transport:5s} overlap={overlap!s:5s}: median TTFT "
                            f"{statistics.median(samples) * 1e3:8.1f} ms",
                            flush=True,
                        )
            finally:
                for language, _ in services.values():
                    language.stop()
    finally:
        encode.stop()
    return report(medians, counts, args.transports.split(","))


def report(medians: dict, counts: list, transports: list[str]) -> dict:
    print(f"\n{'images':>8}{'transport':>11}{'overlap ms':>12}{'no-overlap ms':>15}{'ratio':>8}")
    rows = {}
    for count in counts:
        for transport in transports:
            on, off = medians[(count, transport, True)], medians[(count, transport, False)]
            rows[f"{count}/{transport}"] = {"overlap_s": on, "no_overlap_s": off, "ratio": on / off}
            print(f"{count!s:>8}{transport:>11}{on * 1e3:>12.1f}{off * 1e3:>15.1f}{on / off:>8.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="medium", help="the text model's shape (bench.common)")
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--side", type=int, default=448, help="image side in pixels (multiple of 32)")
    p.add_argument("--images", default="1,4,8", help="images per request, comma-separated")
    p.add_argument("--video", action="store_true", help="one 16-frame clip per request instead")
    p.add_argument("--transports", default="grpc,ipc")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="auto", help="both services' --dtype (the checkpoint: fp32)")
    p.add_argument("--encode-cores", default="0")
    p.add_argument("--language-cores", default="1")
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here")
    p.add_argument("--json", type=Path, default=None, help="write the medians and ratios here")
    args = p.parse_args(argv)
    print_balance(args)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="splitvl-ttft-") as tmp:
            rows = run(args, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
