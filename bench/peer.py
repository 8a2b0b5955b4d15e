"""splitvl's language engine side by side with an external peer engine (vLLM-CPU) on one workload.

The workload is a ``work.json`` written by the peer recipe's ``make_work.py``: raw prompt token ids
(not chat text) with ONE ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``
where a request has an image, the PNG's path, and ``max_tokens``; ``timed`` requests plus two
``warmup`` ones. Both sides run the warm-up first, then all timed requests at once, greedy, with
ignore_eos, under the same limits (max_num_seqs 32, max_num_batched_tokens 2048,
max_model_len 1024, 1 GiB of KV cache) and on the same cores.

splitvl runs in this process: the PNG bytes are read before the timing; inside it each image is
hashed, decoded and preprocessed as the encode service does, the vision tower runs once over all
images, each image's single pad is expanded to its token count, and the engine generates. The
peer runs ``PEER_PYTHON RECIPE/vllm_offline.py CKPT WORK DTYPE OUT.json`` in a subprocess
(``VLLM_CPU_OMP_THREADS_BIND`` set to the cores) and reports the same numbers. Rounds alternate
(splitvl, peer, splitvl, peer, ...) because these machines are noisy.

``--baseline DIR`` adds a third side, the engine of another checkout (an earlier commit, say),
and prints the ratio of this checkout's speed to it; then both splitvl sides run in fresh
processes (each checkout's own code, this interpreter), so neither inherits the other's state.

    python -m bench.peer --peer-python ~/peer/vllm-venv/bin/python \\
        --recipe ../shared/bench/peer-vllm-cpu --ckpt ~/peer/ckpt-medium --work ~/peer/work \\
        --dtype float32 --rounds 2

``--shape medium,wide,odd`` (generated shapes, `bench.peer_ckpt.prepare`) replaces --ckpt/--work;
``--dtype float32,bfloat16`` runs both; each table starts with the CPU's model and SIMD features.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.peer_ckpt import add_case_args, cases
from shared.kernels.cpu.allocator import keep_freed_memory

# The limits both sides run under (the peer's are fixed in its recipe's vllm_offline.py).
MAX_NUM_SEQS = 32
MAX_NUM_BATCHED_TOKENS = 2048
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Result:
    """One side's run of the timed requests."""

    side: str
    dtype: str
    time_s: float  # the timed region: all timed requests, images included
    output_tokens: int
    prompt_lens: list[int]  # after each side's image pad expansion
    tokens: list[list[int]]  # every timed request's generated ids, in work.json order
    wall_s: float  # the whole run: loading, warm-up and the timed region

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.time_s


@dataclass(frozen=True)
class EnginePrompt:
    """One request for the engine: pads expanded, per image (packed [n, (1+k)*H], grid, sha256)."""

    ids: list[int]
    images: list[tuple[torch.Tensor, tuple[int, int, int], str]]
    max_tokens: int


def parse_cores(spec: str) -> set[int]:
    """'0-1' or '0,2,4-5' (the VLLM_CPU_OMP_THREADS_BIND syntax) -> a set of core ids."""
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def _engine_session(
    ckpt_dir: Path,
    dtype: str,
    phases: list[tuple[str, Callable[[], list[EnginePrompt]]]],
    threads: int,
) -> list[tuple[float, list[list[int]]]]:
    """The only code here that touches the language engine's API.

    Builds the engine under the shared limits, then for each phase times ``prepare()`` (which
    runs the vision tower) plus generating all its prompts at once; returns (seconds, tokens) per
    phase.
    """
    from services.language.engine import AsyncEngine, EngineConfig
    from services.language.engine import request as api
    from shared.wire.images import EncodedImage

    config = EngineConfig(
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory=KV_CACHE_BYTES,
        dtype=dtype,
        device="cpu",
        threads=threads,
    )
    engine = AsyncEngine.from_model_dir(ckpt_dir, config)

    async def drain(stream) -> list[int]:
        return [t async for out in stream for t in out.new_token_ids]

    async def run_phase(name: str, prepare) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        prompts = prepare()
        streams = [
            engine.generate(
                api.GenerationRequest(
                    f"{name}-{i}",
                    tuple(p.ids),
                    tuple(EncodedImage(*image) for image in p.images),
                    api.SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True),
                    time.time(),
                )
            )
            for i, p in enumerate(prompts)
        ]
        tokens = await asyncio.gather(*(drain(s) for s in streams))
        return time.perf_counter() - start, list(tokens)

    async def main() -> list[tuple[float, list[list[int]]]]:
        await engine.start()
        try:
            return [await run_phase(name, prepare) for name, prepare in phases]
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def _image_paths(request: dict) -> list[str]:
    image = request.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def _prompt_builders(ckpt_dir: Path, dtype: str, *batches: list[dict]):
    """One callable per batch of work.json requests, each returning its EnginePrompts (running
    the vision tower on that batch's images)."""
    from shared.model.config import DTYPES, load_config
    from shared.model.loader import load_vision_model
    from shared.model.processing import (
        decode_image,
        load_image_processor_config,
        num_image_tokens,
        preprocess_image,
    )
    from shared.wire.units import compute_dtype

    config = load_config(ckpt_dir)
    processor = load_image_processor_config(ckpt_dir)
    # As the encode service: computed in compute_dtype, handed on in the requested dtype.
    wire = DTYPES[dtype]
    vision = load_vision_model(ckpt_dir, dtype=compute_dtype(wire, "cpu"), device="cpu")
    pad = config.image_token_id

    def builder(requests: list[dict]) -> Callable[[], list[EnginePrompt]]:
        data = [[Path(p).read_bytes() for p in _image_paths(r)] for r in requests]  # not timed
        return lambda: build(requests, data)

    def build(requests: list[dict], data: list[list[bytes]]) -> list[EnginePrompt]:
        # As the encode service: sha256 of the bytes, decode, preprocess, one vision forward.
        flat = [b for per in data for b in per]
        encoded = []
        if flat:
            digests = [hashlib.sha256(b).hexdigest() for b in flat]
            pre = [preprocess_image(decode_image(b), processor) for b in flat]
            grids = [grid for _, grid in pre]
            with torch.inference_mode():
                packed = vision(torch.cat([pv for pv, _ in pre]), torch.tensor(grids)).to(wire)
            counts = [num_image_tokens(g, processor.merge_size) for g in grids]
            encoded = list(zip(packed.split(counts), grids, digests, strict=True))
        prompts, k = [], 0
        for request, per in zip(requests, data, strict=True):
            images = encoded[k : k + len(per)]
            k += len(per)
            if request["ids"].count(pad) != len(images):
                raise ValueError(
                    f"a request has {request['ids'].count(pad)} image pads for "
                    f"{len(images)} images; work.json has one pad per image"
                )
            ids, it = [], iter(images)
            for t in request["ids"]:
                if t == pad:
                    ids.extend([pad] * next(it)[0].shape[0])
                else:
                    ids.append(t)
            prompts.append(EnginePrompt(ids, images, int(request["max_tokens"])))
        return prompts

    return [builder(requests) for requests in batches]


def run_splitvl(
    ckpt_dir: str | Path,
    work_dir: str | Path,
    dtype: str,
    threads: int = 2,
    cores: str | None = None,
) -> Result:
    """splitvl's engine (and vision tower) in this process on work.json, ``threads`` threads."""
    t0 = time.perf_counter()
    keep_freed_memory()  # as the services do, before the engine's thread starts
    ckpt_dir, work = Path(ckpt_dir), json.loads((Path(work_dir) / "work.json").read_text())
    if cores:
        os.sched_setaffinity(0, parse_cores(cores))  # this thread and the threads it starts
    torch.set_num_threads(threads)
    warmup, timed = _prompt_builders(ckpt_dir, dtype, work["warmup"], work["timed"])
    lens: list[int] = []

    def timed_prompts() -> list[EnginePrompt]:
        prompts = timed()
        lens.extend(len(p.ids) for p in prompts)
        return prompts

    (_, _), (elapsed, tokens) = _engine_session(
        ckpt_dir, dtype, [("warmup", warmup), ("timed", timed_prompts)], threads
    )
    return Result(
        "splitvl", dtype, elapsed, sum(map(len, tokens)), lens, tokens, time.perf_counter() - t0
    )


# run_splitvl in a fresh process of another checkout: argv ckpt work dtype threads cores out
_CHECKOUT_RUN = (
    "import dataclasses, json, sys\n"
    "from bench.peer import run_splitvl\n"
    "ckpt, work, dtype, threads, cores, out = sys.argv[1:]\n"
    "result = run_splitvl(ckpt, work, dtype, int(threads), cores)\n"
    "open(out, 'w').write(json.dumps(dataclasses.asdict(result)))\n"
)


def run_checkout(
    repo: str | Path,
    side: str,
    ckpt_dir: str | Path,
    work_dir: str | Path,
    dtype: str,
    threads: int,
    cores: str,
) -> Result:
    """``run_splitvl`` of the checkout at ``repo`` in a subprocess, reported as ``side``."""
    args = [sys.executable, "-c", _CHECKOUT_RUN, str(ckpt_dir), str(work_dir), dtype]
    fields = _json_run([*args, str(threads), cores], f"splitvl run in {repo}", cwd=repo)
    return Result(**{**fields, "side": side})


def _json_run(command: list[str], what: str, cwd=None, env=None) -> dict:
    """Run `command` with a JSON output file's path appended; that file's content."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [*command, str(out)], cwd=cwd or tmp, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def run_peer(
    peer_python: str | Path,
    recipe_dir: str | Path,
    ckpt_dir: str | Path,
    work_dir: str | Path,
    dtype: str,
    cores: str = "0-1",
) -> Result:
    """``peer_python recipe_dir/vllm_offline.py`` in a subprocess bound to ``cores``."""
    t0 = time.perf_counter()
    script = Path(recipe_dir) / "vllm_offline.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: --recipe must be the peer recipe folder")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=cores)
    command = [str(peer_python), str(script), str(ckpt_dir), str(work_dir), dtype]
    res = _json_run(command, "peer run", env=env)
    return Result(
        "vllm",
        dtype,
        res["time_s"],
        res["output_tokens"],
        res["prompt_lens"],
        res["tokens"],
        time.perf_counter() - t0,
    )


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    """Requests whose generated ids are the same on both sides."""
    return sum(x == y for x, y in zip(a, b, strict=True))


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each request's tokens before the first disagreement."""
    fractions = []
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
        fractions.append(same / max(1, len(x)))
    return sum(fractions) / len(fractions)


def side_by_side(
    peer_python: str | Path,
    recipe_dir: str | Path,
    ckpt_dir: str | Path,
    work_dir: str | Path,
    dtype: str,
    rounds: int = 2,
    threads: int = 2,
    cores: str | None = None,
    baseline: str | Path | None = None,
) -> tuple[list[Result], list[Result]]:
    """Alternate splitvl (and a baseline checkout) and the peer; print rounds and medians."""
    cores = cores or f"0-{threads - 1}"
    os.sched_setaffinity(0, parse_cores(cores))
    here = Path(__file__).resolve().parents[1]
    ours, peers, base = [], [], []
    for r in range(1, rounds + 1):
        if baseline is None:
            ours.append(run_splitvl(ckpt_dir, work_dir, dtype, threads, cores))
        else:
            ours.append(run_checkout(here, "splitvl", ckpt_dir, work_dir, dtype, threads, cores))
            base.append(
                run_checkout(baseline, "baseline", ckpt_dir, work_dir, dtype, threads, cores)
            )
        peers.append(run_peer(peer_python, recipe_dir, ckpt_dir, work_dir, dtype, cores))
        for res in (ours[-1], *base[-1:], peers[-1]):
            print(
                f"round {r} {res.side:8s} {dtype}: {res.tok_s:7.1f} output tok/s "
                f"({res.output_tokens} tokens in {res.time_s:.2f} s; run {res.wall_s:.1f} s)",
                flush=True,
            )
    ours_tps = statistics.median(x.tok_s for x in ours)
    peer_tps = statistics.median(x.tok_s for x in peers)
    a, b = ours[-1], peers[-1]
    print(
        f"median {dtype}: splitvl {ours_tps:.1f} tok/s, vllm {peer_tps:.1f} tok/s, "
        f"ratio splitvl/vllm {ours_tps / peer_tps:.2f}x"
    )
    if base:
        base_tps = statistics.median(x.tok_s for x in base)
        print(
            f"median {dtype}: baseline {base_tps:.1f} tok/s ({baseline}), ratio "
            f"splitvl/baseline {ours_tps / base_tps:.2f}x; greedy tokens identical "
            f"{identical(a.tokens, base[-1].tokens)}/{len(a.tokens)}"
        )
    print(
        f"greedy tokens identical: {identical(a.tokens, b.tokens)}/{len(a.tokens)} requests "
        f"(prefix agreement {prefix_agreement(a.tokens, b.tokens):.3f}); prompt lengths "
        f"{'match' if a.prompt_lens == b.prompt_lens else 'DIFFER'}; each side repeatable "
        f"across rounds: splitvl {all(x.tokens == a.tokens for x in ours)}, "
        f"vllm {all(x.tokens == b.tokens for x in peers)}"
    )
    return ours, peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", required=True, help="the peer venv's python")
    parser.add_argument("--recipe", dest="recipe_dir", required=True, help="the recipe folder")
    parser.add_argument("--ckpt", dest="ckpt_dir", help="checkpoint both sides load")
    parser.add_argument("--work", dest="work_dir", help="folder holding work.json")
    add_case_args(parser, "--ckpt/--work")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="splitvl's torch threads")
    parser.add_argument("--cores", help="both sides' cores, as VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--baseline", help="another splitvl checkout, run as a third side")
    args = parser.parse_args()
    if (args.shape is None) == (args.ckpt_dir is None or args.work_dir is None):
        parser.error("give --shape, or --ckpt and --work")
    kept = {k: v for k, v in vars(args).items() if k not in ("shape", "cache", "dtype")}
    for ckpt, work, dtype in cases(args, Path(args.recipe_dir), args.ckpt_dir, args.work_dir):
        side_by_side(**kept | {"ckpt_dir": ckpt, "work_dir": work, "dtype": dtype})


if __name__ == "__main__":
    main()
