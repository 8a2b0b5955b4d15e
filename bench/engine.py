"""Throughput of the language engine against transformers ``generate`` on the same checkpoint.

A random-weight Qwen3-VL-MoE checkpoint of the chosen shape is written by transformers; 32
requests (text-only, one-image and two-image prompts of mixed lengths, mixed output lengths) run
through transformers as a user would batch them (left padding, all at once, generating up to the
longest requested output) and through the engine (continuous batching, vision tower run once
over all images inside the timed region). Only requested output tokens count for either side.

    python -m bench.engine --shape medium --device cpu --dtype float32

With ``--peer-python`` it instead runs bench.peer's side-by-side against vLLM-CPU on that
recipe's checkpoint and work.json (see bench/peer.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import SHAPES, hf_config, shape_configs, sync
from shared.model.config import DTYPES


@dataclass(frozen=True)
class Workload:
    """One benchmark request: prompt ids with expanded pads, its images, its output length."""

    ids: list[int]
    pixel_values: torch.Tensor | None  # [N, patch_dim]
    grid_thw: list[tuple[int, int, int]]
    max_tokens: int


def write_checkpoint(
    path: Path, shape: str, layers: int | None, dtype: torch.dtype, device: str
) -> None:
    """Random-weight checkpoint of ``shape`` written by transformers, plus a tokenizer."""
    from scripts.testkit.checkpoints import (
        Init,
        preprocessor_config,
        write_vl_checkpoint,
    )
    from scripts.testkit.tokenizers import save_tokenizer

    text, _, special = shape_configs(shape, layers)
    config = hf_config(shape, layers)
    write_vl_checkpoint(
        path,
        config,
        preprocessor_config(64 * 64, 1024 * 1024),
        seed=0,
        init=Init(std=0.05, norm_std=0.1, bias_std=0.02),
        dtype=dtype,
        device=device,
    )
    pinned = {
        "<|image_pad|>": special["image"],
        "<|video_pad|>": special["video"],
        "<|vision_start|>": special["start"],
        "<|vision_end|>": special["end"],
        "<|im_end|>": min(text["vocab_size"] - 5, 151645),
    }
    save_tokenizer(path, None, pinned, vocab_size=text["vocab_size"])


def make_workload(model_dir: Path, num_requests: int, seed: int) -> list[Workload]:
    """Mixed requests: half text-only, a quarter one image, a quarter two images."""
    from PIL import Image

    from shared.model.config import load_config
    from shared.model.processing import load_image_processor_config, preprocess_image

    config = load_config(model_dir)
    proc = load_image_processor_config(model_dir)
    rng = np.random.default_rng(seed)
    sizes = [(224, 224), (320, 192), (160, 288), (256, 256)]
    work = []
    for i in range(num_requests):
        num_images = (0, 0, 1, 2)[i % 4]
        ids = rng.integers(0, 250, int(rng.integers(16, 160))).tolist()
        pixel_values, grids = [], []
        for _ in range(num_images):
            w, h = sizes[int(rng.integers(len(sizes)))]
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            pv, grid = preprocess_image(image, proc)
            pixel_values.append(pv)
            grids.append(grid)
            pads = [config.image_token_id] * (grid[0] * grid[1] * grid[2] // 4)
            ids += [config.vision_start_token_id, *pads, config.vision_end_token_id]
            ids += rng.integers(0, 250, int(rng.integers(4, 24))).tolist()
        work.append(
            Workload(
                ids,
                torch.cat(pixel_values) if pixel_values else None,
                grids,
                int(rng.choice([16, 32, 64, 128])),
            )
        )
    return work


@torch.inference_mode()
def run_transformers(model_dir: Path, work: list[Workload], dtype, device) -> tuple[float, list]:
    """transformers generate, all requests in one left-padded batch, greedy."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    image_id = model.config.image_token_id
    width = max(len(w.ids) for w in work)
    pad = 0
    ids = torch.full((len(work), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, w in enumerate(work):
        ids[row, width - len(w.ids) :] = torch.tensor(w.ids)
        mask[row, width - len(w.ids) :] = 1
    kwargs = {}
    with_images = [w for w in work if w.pixel_values is not None]
    if with_images:
        kwargs = dict(
            pixel_values=torch.cat([w.pixel_values for w in with_images]).to(device, dtype),
            image_grid_thw=torch.tensor([g for w in with_images for g in w.grid_thw]).to(device),
            mm_token_type_ids=(ids == image_id).long().to(device),
        )
    max_new = max(w.max_tokens for w in work)
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad,
        **kwargs,
    )
    sync(device)
    elapsed = time.perf_counter() - start
    tokens = [out[row, width : width + w.max_tokens].tolist() for row, w in enumerate(work)]
    del model
    return elapsed, tokens


def run_engine(
    model_dir: Path, work: list[Workload], dtype_name: str, device, max_num_batched_tokens: int
) -> tuple[float, list]:
    """The engine with every request submitted at once; the vision tower runs inside the timing."""
    from services.language.engine import AsyncEngine, EngineConfig
    from services.language.engine.request import GenerationRequest, SamplingParams
    from shared.model.loader import load_vision_model
    from shared.wire.images import EncodedImage

    dtype = DTYPES[dtype_name]
    vision = load_vision_model(model_dir, dtype=dtype, device=device).eval()
    max_len = max(len(w.ids) + w.max_tokens for w in work)
    config = EngineConfig(
        max_num_seqs=len(work),
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_len,
        dtype=dtype_name,
        device=str(device),
    )
    engine = AsyncEngine.from_model_dir(model_dir, config)

    def encode() -> list[tuple]:
        with_images = [w for w in work if w.pixel_values is not None]
        if not with_images:
            return [() for _ in work]
        grids = [g for w in with_images for g in w.grid_thw]
        with torch.inference_mode():
            packed = vision(
                torch.cat([w.pixel_values for w in with_images]).to(device, dtype),
                torch.tensor(grids, device=device),
            )
        images, row = [], 0
        for w in work:
            per = []
            for grid in w.grid_thw:
                n = grid[0] * grid[1] * grid[2] // 4
                digest = hashlib.sha256(str((len(images), row)).encode()).hexdigest()
                per.append(EncodedImage(packed[row : row + n], tuple(grid), digest))
                row += n
            images.append(tuple(per))
        return images

    async def main() -> tuple[float, list]:
        await engine.start()
        try:
            sync(device)
            start = time.perf_counter()
            images = encode()
            streams = [
                engine.generate(
                    GenerationRequest(
                        f"r{i}",
                        tuple(w.ids),
                        images[i],
                        SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True),
                        time.time(),
                    )
                )
                for i, w in enumerate(work)
            ]

            async def drain(stream):
                return [t async for out in stream for t in out.new_token_ids]

            tokens = await asyncio.gather(*(drain(s) for s in streams))
            sync(device)
            return time.perf_counter() - start, tokens
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each request's tokens before the first disagreement."""
    fractions = []
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
        fractions.append(same / max(1, len(x)))
    return sum(fractions) / len(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the decoder depth (e.g. a shallow 30b-a3b on one GPU)",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peer-python",
        default=None,
        help="compare against vLLM-CPU (bench.peer) instead of transformers: "
        "the peer venv's python; needs --peer-recipe/--peer-ckpt/--peer-work",
    )
    parser.add_argument("--peer-recipe", help="folder holding the peer's vllm_offline.py")
    parser.add_argument("--peer-ckpt", help="checkpoint both engines load")
    parser.add_argument("--peer-work", help="folder holding the shared work.json")
    args = parser.parse_args()
    if args.peer_python:
        if not (args.peer_recipe and args.peer_ckpt and args.peer_work) or args.device != "cpu":
            parser.error("--peer-python needs --peer-recipe, --peer-ckpt, --peer-work and cpu")
        from bench.peer import side_by_side

        side_by_side(args.peer_python, args.peer_recipe, args.peer_ckpt, args.peer_work, args.dtype)
        return
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_checkpoint(model_dir, args.shape, args.layers, dtype, args.device)
        work = make_workload(model_dir, args.num_requests, args.seed)
        num_out = sum(w.max_tokens for w in work)
        print(
            f"shape={args.shape} device={args.device} dtype={args.dtype} "
            f"requests={len(work)} prompt_tokens={sum(len(w.ids) for w in work)} "
            f"images={sum(len(w.grid_thw) for w in work)} output_tokens={num_out}"
        )
        hf_time, hf_tokens = run_transformers(model_dir, work, dtype, device)
        engine_time, engine_tokens = run_engine(
            model_dir, work, args.dtype, device, args.max_num_batched_tokens
        )
    hf_tps, engine_tps = num_out / hf_time, num_out / engine_time
    print(f"transformers generate: {hf_time:8.2f} s  {hf_tps:9.1f} output tok/s")
    print(f"engine:                {engine_time:8.2f} s  {engine_tps:9.1f} output tok/s")
    print(f"ratio engine / transformers: {engine_tps / hf_tps:.2f}x")
    print(f"greedy agreement (prefix fraction): {_agreement(engine_tokens, hf_tokens):.3f}")


if __name__ == "__main__":
    main()
