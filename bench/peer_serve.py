"""Both services side by side with vLLM-CPU's server under vLLM's own serving benchmark.

Per round and dtype: splitvl (an encode replica and a language service on the shipped
launchers, the peer's limits) then vLLM (the recipe's ``serve_peer.sh``) serve the same
checkpoint on the same cores, and the recipe's ``bench_serve.sh`` (``vllm bench serve``,
random-mm 224 px images, 64 prompts) runs against each at every concurrency with the same
seed; seeds change between rounds so no prefix cache profits from a repeat. Prints each run and
the median output tok/s ratio per concurrency. `--also "--no-overlap"` (repeatable) adds a splitvl
side started with those language-service flags, so a change can be judged against the peer and
against the default in one run.

    python -m bench.peer_serve --peer-venv ~/peer/vllm-venv \\
        --recipe ../shared/bench/peer-vllm-cpu \\
        --ckpt ~/peer/ckpt-medium --dtype float32 --concurrency 8,32 --rounds 2
    python -m bench.peer_serve --peer-venv ~/peer/vllm-venv \
        --recipe ../shared/bench/peer-vllm-cpu --shape medium,wide,odd --dtype float32,bfloat16

`--shape` and a list of dtypes as in `bench.peer`; each table starts with the CPU's model and
SIMD features.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.peer import KV_CACHE_BYTES, MAX_MODEL_LEN, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from bench.peer_ckpt import add_case_args, cases
from scripts.testkit.launch import start_encode, start_language
from services.common.placement import OFF_ENV

_START_TIMEOUT_S = 600.0


def _limits(dtype: str) -> list[str]:
    return [
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-batched-tokens",
        str(MAX_NUM_BATCHED_TOKENS),
        "--kv-cache-memory",
        str(KV_CACHE_BYTES),
    ]


class Splitvl:
    """An encode replica and a language service on loopback, `threads` each."""

    def __init__(
        self,
        ckpt: Path,
        dtype: str,
        workdir: Path,
        threads: int | None,
        encode_threads: int | None,
        extra: tuple[str, ...] = (),
    ):
        # None: the services' own CPU placement (they register and split the cores), which an
        # OMP_NUM_THREADS (the launcher sets 1) or the caller's SPLITVL_PLACEMENT=off would stop
        env = {"OMP_NUM_THREADS": str(encode_threads or ""), OFF_ENV: "on"}
        self.encode, address = start_encode(ckpt, workdir, ["--dtype", dtype], env=env)
        args = [
            "--encode",
            address,
            "--served-model-name",
            ckpt.name,
            *(("--threads", str(threads)) if threads else ()),
            *_limits(dtype),
            *extra,
        ]
        try:
            self.language, self.url, _ = start_language(
                ckpt, workdir, args, env={"OMP_NUM_THREADS": "", OFF_ENV: "on"}
            )
        except BaseException:
            self.encode.stop()
            raise

    def stop(self) -> None:
        self.language.stop()
        self.encode.stop()


class Vllm:
    """The recipe's serve_peer.sh in its own process group."""

    def __init__(
        self, venv: Path, recipe: Path, ckpt: Path, dtype: str, port: int, cores: str, log: Path
    ):
        env = dict(os.environ, VENV=str(venv), VLLM_CPU_OMP_THREADS_BIND=cores)
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            ["bash", str(recipe / "serve_peer.sh"), str(ckpt), str(port), dtype],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vLLM not healthy after {_START_TIMEOUT_S:.0f} s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


def bench_serve(
    venv: Path, recipe: Path, url: str, ckpt: Path, out: Path, concurrency: int, seed: int
) -> dict:
    """One `vllm bench serve` run; its result JSON."""
    env = dict(os.environ, VENV=str(venv))
    cmd = [
        "bash",
        str(recipe / "bench_serve.sh"),
        url,
        ckpt.name,
        str(ckpt),
        str(out),
        str(concurrency),
        str(seed),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_serve.sh failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads((out / f"bench_c{concurrency}.json").read_text())


def _line(side: str, dtype: str, c: int, seed: int, res: dict) -> str:
    nan = float("nan")
    return (
        f"{side:22s} {dtype:8s} c={c:<3d} seed={seed:<4d} {res['output_throughput']:7.1f} "
        f"output tok/s, TTFT median {res.get('median_ttft_ms', nan):7.1f} ms p99 "
        f"{res.get('p99_ttft_ms', nan):7.1f}, TPOT median {res.get('median_tpot_ms', nan):6.1f}"
        f" ms, {res.get('completed')} ok / {res.get('failed', 0)} failed"
    )


def compare(args: argparse.Namespace, ckpt: Path, dtype: str) -> None:
    """Every round's runs of every side on `ckpt` in `dtype`, then the median ratios."""
    cores = args.cores or f"0-{os.cpu_count() - 1}"
    levels = [int(c) for c in args.concurrency.split(",")]
    sides = {"splitvl": ()} | {f"splitvl {f}": tuple(f.split()) for f in args.also}
    tok: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            seed = args.seed + r
            for i, side in enumerate([*sides, "vllm"]):
                work = tmp / f"{i}-{r}"
                work.mkdir()
                server = (
                    Splitvl(ckpt, dtype, work, args.threads, args.encode_threads, sides[side])
                    if side in sides
                    else Vllm(
                        args.peer_venv,
                        args.recipe,
                        ckpt,
                        dtype,
                        args.port,
                        cores,
                        work / "vllm.log",
                    )
                )
                try:
                    for c in levels:
                        res = bench_serve(
                            args.peer_venv, args.recipe, server.url, ckpt, work, c, seed
                        )
                        tok.setdefault((side, c), []).append(res["output_throughput"])
                        print(_line(side, dtype, c, seed, res), flush=True)
                finally:
                    server.stop()
    for c in levels:
        theirs = statistics.median(tok["vllm", c])
        for side in sides:
            ours = statistics.median(tok[side, c])
            print(
                f"median {dtype} c={c}: {side} {ours:.1f} tok/s, vllm {theirs:.1f} tok/s, "
                f"ratio {side}/vllm {ours / theirs:.2f}x"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-venv", type=Path, required=True)
    p.add_argument("--recipe", type=Path, required=True, help="the peer recipe folder")
    p.add_argument("--ckpt", type=Path, help="the checkpoint both serve")
    add_case_args(p, "--ckpt")
    p.add_argument("--concurrency", default="8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=100, help="the first round's seed")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the language service's threads (default: "
        "its share of the cores beside the encode replica)",
    )
    p.add_argument("--encode-threads", type=int, default=None, help="default: its share")
    p.add_argument("--cores", default=None, help="vLLM's cores (default 0-<nproc-1>)")
    p.add_argument("--port", type=int, default=8765, help="vLLM's port")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="FLAGS",
        help='another splitvl side with these language flags, e.g. --also="--no-overlap"',
    )
    args = p.parse_args()
    if (args.shape is None) == (args.ckpt is None):
        p.error("give --shape or --ckpt")
    for ckpt, _, dtype in cases(args, args.recipe, args.ckpt):
        compare(args, ckpt, dtype)


if __name__ == "__main__":
    main()
