"""Prefill latency: one image's vision tower, then a prompt of the image and 42 text tokens.

Random weights made in memory on the device. (a) The vision tower on one square image (1024 x
1024 pixels -> 1024 merged tokens at the 30B-A3B shape); (b) one prefill step through the engine
of 8 text tokens, the image's pads, 32 text tokens (1066 tokens) with the image's embeddings
spliced in. With `--hf`, transformers' vision tower and prefill forward on the same shape follow
(our models freed first) and the ratios are printed.

    python -m bench.prefill --shape 30b-a3b --device cuda --dtype bfloat16 --hf
    python -m bench.prefill --shape tiny --device cpu --side 64 --hf   (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from bench.common import (
    SHAPES,
    hf_config,
    model_config,
    random_text_model,
    random_tokenizer,
    random_vision_model,
    save_result,
    sync,
)
from services.language.engine.build import core_for_model
from services.language.engine.config import EngineConfig
from services.language.engine.request import GenerationRequest, SamplingParams
from shared.model.config import DTYPES
from shared.wire.images import EncodedImage

_REPEATS = 5


def _image_inputs(config, side: int, device: str, dtype: torch.dtype):
    vision = config.vision
    grid = side // vision.patch_size
    pixels = torch.randn(grid * grid, vision.patch_dim, device=device, dtype=dtype)
    return pixels, torch.tensor([[1, grid, grid]]), grid * grid // vision.spatial_merge_size**2


def _timed(fn, device: str) -> float:
    """Median seconds of `fn()` over a few repeats, after one warm-up."""
    fn()
    times = []
    for _ in range(_REPEATS):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompt(config, num_image_tokens: int) -> list[int]:
    return (
        [11] * 8
        + [config.vision_start_token_id]
        + [config.image_token_id] * num_image_tokens
        + [config.vision_end_token_id]
        + [12] * 32
    )


def engine_prefill(args, config) -> dict[str, float]:
    dtype = DTYPES[args.dtype]
    vision = random_vision_model(config, dtype, args.device)
    pixels, grid, num_tokens = _image_inputs(config, args.side, args.device, dtype)
    with torch.inference_mode():
        vision_s = _timed(lambda: vision(pixels, grid), args.device)
        packed = vision(pixels, grid)
    model = random_text_model(config, dtype, args.device)
    ids = _prompt(config, num_tokens)
    engine_config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=len(ids) + 16,
        max_model_len=len(ids) + 16,
        device=args.device,
        dtype=args.dtype,
        enable_prefix_caching=False,
        kv_cache_memory=args.kv_cache_memory,
    )
    core = core_for_model(model, config, random_tokenizer(config.text.vocab_size), engine_config)
    image = EncodedImage(packed, tuple(grid[0].tolist()), "0" * 64)
    counter = iter(range(1 << 30))

    def prefill() -> None:
        request = GenerationRequest(
            f"p{next(counter)}",
            tuple(ids),
            (image,),
            SamplingParams(temperature=0.0, max_tokens=1),
            0.0,
        )
        core.add_request(request)
        core.step()  # the whole prompt in one step; max_tokens=1 finishes it there
        while core.has_work():
            core.step()

    prefill_s = _timed(prefill, args.device)
    print(
        f"engine  vision {num_tokens}-token image {vision_s * 1e3:8.2f} ms; "
        f"prefill {len(ids)} tokens {prefill_s * 1e3:8.2f} ms",
        flush=True,
    )
    core = model = vision = None  # freed before transformers loads its own copy
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return {"vision_ms": vision_s * 1e3, "prefill_ms": prefill_s * 1e3, "prompt_tokens": len(ids)}


def hf_prefill(args, config) -> dict[str, float]:
    from transformers import Qwen3VLMoeForConditionalGeneration

    cfg = hf_config(args.shape, args.layers)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    pixels, grid, num_tokens = _image_inputs(config, args.side, args.device, dtype)
    grid = grid.to(args.device)
    ids = torch.tensor([_prompt(config, num_tokens)], device=args.device)
    kw = dict(
        pixel_values=pixels,
        image_grid_thw=grid,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == config.image_token_id).int(),
    )
    with torch.inference_mode():
        vision_s = _timed(lambda: model.model.visual(pixels, grid_thw=grid), args.device)
        prefill_s = _timed(lambda: model(input_ids=ids, **kw), args.device)
    print(
        f"hf      vision {num_tokens}-token image {vision_s * 1e3:8.2f} ms; "
        f"prefill {ids.shape[1]} tokens {prefill_s * 1e3:8.2f} ms",
        flush=True,
    )
    return {"vision_ms": vision_s * 1e3, "prefill_ms": prefill_s * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="override the decoder depth")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--side", type=int, default=1024, help="image side in pixels")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes (default: fraction)")
    p.add_argument("--hf", action="store_true", help="also time transformers")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    config = model_config(args.shape, args.layers)
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} side={args.side}")
    result = {"engine": engine_prefill(args, config)}
    if args.hf:
        result["hf"] = hf_prefill(args, config)
        for key in ("vision_ms", "prefill_ms"):
            ratio = result["hf"][key] / result["engine"][key]
            print(f"speed-up {key[:-3]}: transformers / engine = {ratio:.2f}x")
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
