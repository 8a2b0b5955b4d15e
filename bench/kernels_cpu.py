"""CPU kernels against their PyTorch references, side by side: ``python -m bench.kernels_cpu``.

Shapes are the medium engine model's (`bench.engine.SHAPES["medium"]`). Each measurement runs
all of its layers, each with its own weights or cache, so a layer's 19-38 MB of experts
cannot sit in L3 between calls as a single repeated layer would; times are per layer. The
reference and the extension alternate within every round and the table gives medians over
rounds, for each thread count. "ext" is `shared.kernels.cpu`'s wrapper, what the engine
calls: fp32 batches with many rows per expert go to the reference's GEMMs (marked). GB/s
for the experts is the bytes of expert weights the step actually needs (every expert that
got a token) over the time; the streaming line is ``x.sum()`` over a 300 MB tensor, the bound
a memory-bound kernel can approach.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import SHAPES
from shared.kernels import cpu
from shared.kernels.cpu import build as cpu_build
from shared.kernels.reference import fused_moe_torch, paged_decode_torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, the callables alternating within every round (fewer
    rounds, at least 3, when one call takes seconds)."""
    warm = max(_seconds(fn) for fn in fns.values())  # page faults, first touch, lazy init
    rounds = max(3, min(rounds, int(20.0 / max(warm, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def stream_gbps(rounds: int) -> float:
    """Read bandwidth of ``x.sum()`` over a 300 MB fp32 tensor."""
    x = torch.ones(300_000_000 // 4)
    seconds = _alternate({"sum": x.sum}, rounds)["sum"]
    return x.numel() * 4 / seconds / 1e9


class MoeCase:
    """All layers' experts of the medium model and one step's routing per layer."""

    def __init__(self, num_tokens: int, dtype: torch.dtype, seed: int = 0):
        text = SHAPES["medium"]["text"]
        hidden, inter = text["hidden_size"], text["moe_intermediate_size"]
        experts, top_k = text["num_experts"], text["num_experts_per_tok"]
        gen = torch.Generator().manual_seed(seed)
        self.layers = []
        for _ in range(text["num_hidden_layers"]):
            gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen) / math.sqrt(hidden)
            down = torch.randn(experts, inter, hidden, generator=gen) / math.sqrt(inter)
            router = torch.randn(num_tokens, experts, generator=gen).softmax(-1)
            weights, ids = router.topk(top_k, dim=-1)
            self.layers.append((gate_up.to(dtype), down.to(dtype), weights.to(dtype), ids))
        self.x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
        per_expert = 3 * hidden * inter * self.x.element_size()  # gate, up and down
        self.bytes_read = sum(ids.unique().numel() * per_expert for *_, ids in self.layers)

    def run(self, fn: Callable) -> Callable[[], None]:
        def step() -> None:
            for gate_up, down, weights, ids in self.layers:
                fn(self.x, gate_up, down, weights, ids)

        return step


class DecodeCase:
    """All layers' paged caches of the medium model, B sequences of one context length."""

    def __init__(self, batch: int, context: int, dtype: torch.dtype, block_size: int = 16):
        text = SHAPES["medium"]["text"]
        heads, kv, dim = (
            text["num_attention_heads"],
            text["num_key_value_heads"],
            text["head_dim"],
        )
        gen = torch.Generator().manual_seed(1)
        width = -(-context // block_size)
        num_blocks = batch * width + 1
        self.q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
        self.tables = torch.randperm(num_blocks - 1, generator=gen)[: batch * width]
        self.tables = self.tables.view(batch, width).int()  # the runner's int32 tables
        self.lens = torch.full((batch,), context, dtype=torch.long)
        self.scale = dim**-0.5
        self.caches = [
            (
                torch.randn(num_blocks, block_size, kv, dim, generator=gen).to(dtype),
                torch.randn(num_blocks, block_size, kv, dim, generator=gen).to(dtype),
            )
            for _ in range(text["num_hidden_layers"])
        ]
        self.bytes_read = 2 * batch * context * kv * dim * self.q.element_size() * len(self.caches)

    def run(self, fn: Callable) -> Callable[[], None]:
        def step() -> None:
            for k, v in self.caches:
                fn(self.q, k, v, self.tables, self.lens, self.scale)

        return step


def _row(label: str, threads: int, times: dict[str, float], layers: int, nbytes: int) -> str:
    ref, ext = times["ref"] / layers * 1e3, times["ext"] / layers * 1e3
    gbps = nbytes / times["ext"] / 1e9
    return f"{label:<34} {threads:>3} {ref:>9.3f} {ext:>9.3f} {ref / ext:>7.2f}x {gbps:>7.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tokens", default="1,8,32,64,512", help="fused_moe token counts")
    parser.add_argument("--contexts", default="128,512", help="paged_decode context lengths")
    parser.add_argument("--batch", type=int, default=32, help="paged_decode sequences")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if not cpu.available():
        raise SystemExit(f"the CPU extension is not available: {cpu.build_error()}")
    text = SHAPES["medium"]["text"]
    experts, top_k = text["num_experts"], text["num_experts_per_tok"]
    saved = torch.get_num_threads()
    print(
        f"cpu features: {' '.join(cpu_build.cpu_features())}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (other processes share them)"
    )
    try:
        for n in threads:
            torch.set_num_threads(n)
            print(f"streaming read, {n} thread(s): {stream_gbps(args.rounds):.1f} GB/s")
        print(
            f"\n{'kernel (per layer)':<34} {'thr':>3} {'ref ms':>9} {'ext ms':>9} "
            f"{'speedup':>8} {'GB/s':>7}"
        )
        with torch.inference_mode():
            for name in args.dtypes.split(","):
                dtype = DTYPES[name]
                for tokens in (int(t) for t in args.tokens.split(",")):
                    case = MoeCase(tokens, dtype)
                    for n in threads:
                        torch.set_num_threads(n)
                        fns = {"ref": case.run(fused_moe_torch), "ext": case.run(cpu.fused_moe)}
                        times = _alternate(fns, args.rounds)
                        label = f"fused_moe {name} T={tokens}"
                        rows = cpu.gemm_rows(dtype)
                        if rows is not None and tokens * top_k >= rows * experts:
                            label += " (ref GEMMs)"  # the wrapper delegates there
                        print(_row(label, n, times, len(case.layers), case.bytes_read))
                for context in (int(c) for c in args.contexts.split(",")):
                    case = DecodeCase(args.batch, context, dtype)
                    for n in threads:
                        torch.set_num_threads(n)
                        fns = {
                            "ref": case.run(paged_decode_torch),
                            "ext": case.run(cpu.paged_decode),
                        }
                        times = _alternate(fns, args.rounds)
                        label = f"paged_decode {name} B={args.batch} ctx={context}"
                        print(_row(label, n, times, len(case.caches), case.bytes_read))
    finally:
        torch.set_num_threads(saved)


if __name__ == "__main__":
    main()
