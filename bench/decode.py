"""Decode throughput of the engine at several batch sizes, beside transformers' on the same shape.

Random weights made in memory on the device (no checkpoint): for each batch size B, B requests
with a P-token prompt are prefilled, then N greedy decode steps are timed through the whole
engine core (scheduler, step plan, runner with CUDA graphs on CUDA, sampler, detokenizer).
With `--hf`, transformers' `generate` runs the same shape afterwards (its own random weights,
our model freed first) and the ratio is printed per batch size.

    python -m bench.decode --shape 30b-a3b --device cuda --dtype bfloat16 --batches 1,16,64,128
    python -m bench.decode --shape tiny --device cpu --batches 1,4 --new 8 --hf   (smoke test)
    python -m bench.decode --shape 30b-a3b --layers 2 --device cpu --count-launches

`--fp8` times the same random model as is and quantized to block FP8 at load (as
`--quantization fp8` does), the two engines alternating within each round, and prints the
medians, their ratio and both engines' resident weights:

    python -m bench.decode --shape medium --device cpu --dtype bfloat16 --fp8 --batches 1,4,8 \
        --prompt 128 --new 32 --max-model-len 1024 --kv-cache-memory 1073741824

`--count-launches` counts, on a CPU, the kernel launches one decoder layer makes in one decode
step (bench.launches), for the CUDA kernel selection (the Triton kernels, run in Triton's
interpreter) and for the CPU selection, and prints `launches per decoder layer: N` for each.
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
    save_result,
    sync,
)
from services.language.engine.build import core_for_model
from services.language.engine.config import EngineConfig
from services.language.engine.request import GenerationRequest, SamplingParams
from shared.model.config import DTYPES
from shared.model.fp8 import quantize_fp8, resident_bytes


def build_core(args, config, batches: list[int], quantization: str | None = None):
    """An engine core over a random model (its float weights quantized at load with
    `quantization`, as --quantization does)."""
    dtype = DTYPES[args.dtype]
    model = random_text_model(config, dtype, args.device)
    if quantization is not None:
        quantize_fp8(model)
    engine_config = EngineConfig(
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(2048, args.prompt),
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        kv_cache_memory=args.kv_cache_memory,
    )
    return core_for_model(model, config, random_tokenizer(config.text.vocab_size), engine_config)


def timed_decode(core, args, batch: int, gen: torch.Generator, tag: str) -> tuple[float, float]:
    """(decode tok/s, prefill seconds) of `batch` requests: prefilled, then N steps timed."""
    sampling = SamplingParams(temperature=0.0, max_tokens=args.new + 2, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(100, 800, (args.prompt,), generator=gen).tolist()
        core.add_request(GenerationRequest(f"{tag}{batch}-{i}", tuple(ids), (), sampling, 0.0))
    sync(args.device)
    t0 = time.perf_counter()
    while core.scheduler.num_waiting or any(
        s.num_output_tokens == 0 for s in core.scheduler.running
    ):
        core.step()
    core.step()  # the first decode step (warm)
    sync(args.device)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.new):
        core.step()
    sync(args.device)
    decode_s = time.perf_counter() - t0
    while core.has_work():
        core.step()
    return batch * args.new / decode_s, prefill_s


def engine_decode(args, config, batches: list[int], capture: dict) -> dict[int, float]:
    """tok/s of N decode steps at each batch size (`capture` gets the graphs' capture time and
    memory)."""
    t0 = time.perf_counter()
    core = build_core(args, config, batches)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (CUDA graphs captured if on)")
    graphs = core.executor.runner.graphs
    if graphs is not None:
        capture["seconds"], capture["bytes"] = graphs.capture_seconds, graphs.capture_bytes
    gen = torch.Generator().manual_seed(0)
    results = {}
    for b in batches:
        results[b], prefill_s = timed_decode(core, args, b, gen, "b")
        ms = b * 1e3 / results[b]
        print(
            f"engine  B={b:<4} decode {results[b]:10.1f} tok/s  "
            f"({ms:7.2f} ms/step; prefill + 1 step {prefill_s:.2f} s)",
            flush=True,
        )
    core = None  # freed before transformers loads its own copy
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return results


def compare_fp8(args, config, batches: list[int]) -> dict:
    """Decode tok/s of one random model as is (--dtype) and quantized to FP8 at load, the two
    engines alternating within every round (the machine's load drifts); medians per batch size
    and their ratio, and each engine's resident weights."""
    cores = {q or "float": build_core(args, config, batches, q) for q in (None, "fp8")}
    resident = {k: resident_bytes(core.executor.runner.model) for k, core in cores.items()}
    print(
        f"resident weights: {args.dtype} {resident['float'] / 2**20:.1f} MiB, fp8 "
        f"{resident['fp8'] / 2**20:.1f} MiB ({resident['fp8'] / resident['float']:.3f}x)"
    )
    gen = torch.Generator().manual_seed(0)
    result: dict = {"resident_bytes": resident, "tok_s": {}}
    for b in batches:
        runs: dict[str, list[float]] = {name: [] for name in cores}
        for r in range(args.rounds):
            for name, core in cores.items():
                runs[name].append(timed_decode(core, args, b, gen, f"{name}{r}-")[0])
        tok_s = {name: statistics.median(v) for name, v in runs.items()}
        result["tok_s"][b] = tok_s
        print(
            f"B={b:<4} decode {args.dtype} {tok_s['float']:9.1f} tok/s  fp8 {tok_s['fp8']:9.1f} "
            f"tok/s  fp8 / {args.dtype} = {tok_s['fp8'] / tok_s['float']:.2f}x "
            f"(medians of {args.rounds} alternating rounds)",
            flush=True,
        )
    return result


def _decode_step_launches(config, args) -> tuple[int, dict[str, int]]:
    """(launches of decoder layer 1 in one decode step, by kernel) with the current selection."""
    from bench.launches import LaunchCounter
    from shared.kernels import select

    select.implementation.cache_clear()
    select._backend.cache_clear()
    model = random_text_model(config, torch.bfloat16, "cpu")
    engine_config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_model_len=args.max_model_len,
        device="cpu",
        dtype="bfloat16",
        kv_cache_memory=64 * 2**20,
        pad_decodes=True,  # the shapes a CUDA graph replays: padded rows, full-width tables
    )
    core = core_for_model(model, config, random_tokenizer(config.text.vocab_size), engine_config)
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    core.add_request(GenerationRequest("count", tuple(range(100, 116)), (), sampling, 0.0))
    core.step()  # the prefill (and its first token); the next step decodes one token
    counter = LaunchCounter()
    with counter.counting(model):
        core.step()
    layer = min(1, config.text.num_hidden_layers - 1)
    return counter.per_layer[layer], dict(counter.names.get(layer, {}))


def count_launches(config, args) -> dict[str, dict]:
    """Launches per decoder layer in one decode step, for each kernel selection."""
    import os

    result = {}
    for selection, kernels in (("cuda", "gpu"), ("cpu", "auto")):
        os.environ["SPLITVL_KERNELS"] = kernels
        total, names = _decode_step_launches(config, args)
        result[selection] = {"per_layer": total, "kernels": names}
        detail = ", ".join(f"{name} {n}" for name, n in sorted(names.items()))
        print(f"{selection} selection: launches per decoder layer: {total}  ({detail})")
    return result


def hf_decode(args, batches: list[int]) -> dict[int, float]:
    """transformers generate at each batch size (greedy, min = max new tokens)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    cfg = hf_config(args.shape, args.layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(cfg, dtype=DTYPES[args.dtype])
    model.eval()
    results = {}
    for b in batches:
        ids = torch.randint(100, 800, (b, args.prompt), device=args.device)
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kw)
        sync(args.device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
        sync(args.device)
        results[b] = b * args.new / (time.perf_counter() - t0)
        print(f"hf      B={b:<4} generate {results[b]:8.1f} tok/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="override the decoder depth")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=64, help="timed decode steps")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes (default: fraction)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=32768,
        help="block-table width the steps carry (a realistic one: 32k by default)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--hf", action="store_true", help="also time transformers generate")
    p.add_argument(
        "--fp8",
        action="store_true",
        help="time the model in --dtype and quantized to block FP8, alternating (instead)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds with --fp8")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--count-launches",
        action="store_true",
        help="count one decode step's kernel launches per decoder layer on a CPU (CUDA and CPU "
        "kernel selections) instead of timing",
    )
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    config = model_config(args.shape, args.layers)
    if args.count_launches:
        save_result(args.out, count_launches(config, args))
        return 0
    print(
        f"shape={args.shape} layers={config.text.num_hidden_layers} device={args.device} "
        f"dtype={args.dtype} prompt={args.prompt} new={args.new} torch={torch.__version__}"
    )
    if args.fp8:
        from shared.kernels.cpu.build import cpu_features, cpu_model

        print(f"cpu: {cpu_model()}; features: {' '.join(cpu_features())}")
        save_result(args.out, compare_fp8(args, config, batches))
        return 0
    capture: dict = {}
    ours = engine_decode(args, config, batches, capture)
    result = {"engine_tok_s": ours, "graph_capture": capture}
    if args.hf:
        theirs = hf_decode(args, batches)
        result["hf_tok_s"] = theirs
        for b in batches:
            print(f"ratio B={b}: engine / transformers = {ours[b] / theirs[b]:.2f}x")
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
