"""Delivering one image's packed embeddings: gRPC inline vs a gloo link vs shared memory vs an
in-process copy.

The payload is one 1024-token image at the Qwen3-VL-30B-A3B width: 8192 bf16 values per token
(embeds + 3 deepstack x 2048), 16 MiB. A real encode service process (bf16, a random checkpoint with
the 30B-A3B output width and a 3-block, 64-wide tower) encodes a 1024x1024 image once; each timed
call then names the image by its content hash, so it is a cache hit and its time is delivery: the
Encode call (plus Transfer over the link) from request to a tensor in the client's memory.

Rows, all through services.language.encoder.client except the first and last: "gRPC raw bytes", the
floor for inline, a bare gRPC server streaming pre-built bytes in the same chunks (no tensors, no
copies of its own); "gRPC inline", the client's default: chunks of --chunk-bytes, each copied once
into the message gRPC sends and once into the client's tensor, overlapped with the transfer;
"gRPC inline, 1 msg": the tensor in one message, used in place (no client-side copy, no overlap);
"gloo link": Encode for the ticket, then Transfer and a gloo send/recv; "shared memory": Encode
for the ticket, then CopyToShm, the replica's one copy into the client's pool (the client gets a
view: no copy of its own); "in-process copy": one memcpy of the tensor. The last line prints
shared memory's time over gRPC inline's.

    python -m bench.transfer [--repeats 20] [--chunk-bytes 1MiB] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENS = 1024
OUT_HIDDEN = 2048
NUM_DEEPSTACK = 3
RAW_METHOD = "/bench.Raw/Stream"


def make_checkpoint(path: Path) -> None:
    """A random Qwen3-VL-MoE with the 30B-A3B vision output width; everything else tiny."""
    from scripts.testkit.checkpoints import preprocessor_config, vl_config, write_vl_checkpoint

    text = dict(
        vocab_size=320,
        hidden_size=OUT_HIDDEN,
        num_hidden_layers=NUM_DEEPSTACK,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        moe_intermediate_size=16,
        intermediate_size=32,
        num_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=4096,
    )
    vision = dict(
        depth=NUM_DEEPSTACK,
        hidden_size=64,
        num_heads=2,
        intermediate_size=128,
        out_hidden_size=OUT_HIDDEN,
        num_position_embeddings=64,
        deepstack_visual_indexes=list(range(NUM_DEEPSTACK)),
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    special = {"image": 300, "video": 301, "start": 302, "end": 303}
    side = 32 * 32  # 1024x1024 pixels -> 32x32 merged tokens
    write_vl_checkpoint(
        path,
        vl_config(text, vision, special, (6, 5, 5)),
        preprocessor_config(256 * 256, side * side),
    )


def image_bytes() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- the raw-bytes floor ---------------------------------------------------------------------


def serve_raw(port_file: Path, num_bytes: int, chunk_bytes: int) -> None:
    """A bare gRPC server streaming num_bytes in pre-built chunks (no per-call copy of its own)."""

    async def main() -> None:
        chunks = [
            os.urandom(min(chunk_bytes, num_bytes - o)) for o in range(0, num_bytes, chunk_bytes)
        ]

        async def stream(request, context):
            for chunk in chunks:
                yield chunk

        handler = grpc.method_handlers_generic_handler(
            "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream, None, None)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(json.dumps({"port": port}))
        await server.wait_for_termination()

    asyncio.run(main())


def raw_call(channel: grpc.aio.Channel, num_bytes: int):
    """One raw-bytes stream, as a coroutine factory."""
    call = channel.unary_stream(RAW_METHOD)

    async def once() -> None:
        received = 0
        async for chunk in call(b""):
            received += len(chunk)
        if received != num_bytes:
            raise RuntimeError(f"raw stream gave {received} bytes, expected {num_bytes}")

    return once


def encode_call(client, data: bytes, results: dict, name: str):
    """One cache-hit Encode (by content hash) through EncodeClient, as a coroutine factory."""
    from shared.wire.images import ImageRef, content_hash

    by_hash = [ImageRef(content_hash=content_hash(data))]

    async def once() -> None:
        [got] = await client.encode(by_hash)
        if not got.cache_hit:
            raise RuntimeError("timed call missed the cache; raise --cache-memory")
        results[name] = got.packed

    return once


async def measure(
    address: str, raw_address: str, data: bytes, repeats: int, num_bytes: int, chunk_bytes: int
):
    """Median-friendly timings, the methods interleaved round-robin so load drift hits all alike."""
    from services.language.encoder.client import EncodeClient, EncodeClientConfig
    from shared.wire.images import ImageRef

    configs = {
        "gRPC inline": EncodeClientConfig(
            (address,), "grpc", timeout_s=120, inline_chunk_bytes=chunk_bytes
        ),
        "gRPC inline, 1 msg": EncodeClientConfig(
            (address,), "grpc", timeout_s=120, inline_chunk_bytes=0
        ),
        "gloo link": EncodeClientConfig((address,), "nccl", timeout_s=120),
        "shared memory": EncodeClientConfig((address,), "ipc", timeout_s=120),
    }
    clients = {name: EncodeClient(config) for name, config in configs.items()}
    results: dict[str, torch.Tensor] = {}
    async with grpc.aio.insecure_channel(raw_address) as raw_channel:
        try:
            for client in clients.values():  # computes once, fills the cache, sets up the link
                await client.encode([ImageRef(data)])
            calls = {"gRPC raw bytes": raw_call(raw_channel, num_bytes)}
            for name, client in clients.items():
                calls[name] = encode_call(client, data, results, name)
            copy_src = copy_dst = None
            times: dict[str, list[float]] = {name: [] for name in [*calls, "in-process copy"]}
            for i in range(repeats + 3):
                for name, once in calls.items():
                    t0 = time.perf_counter()
                    await once()
                    if i >= 3:
                        times[name].append(time.perf_counter() - t0)
                if copy_src is None:
                    copy_src = results["gloo link"]
                    copy_dst = torch.empty_like(copy_src)
                t0 = time.perf_counter()
                copy_dst.copy_(copy_src)
                if i >= 3:
                    times["in-process copy"].append(time.perf_counter() - t0)
        finally:
            for client in clients.values():
                await client.close()
    return list(times.items()), results


def report(rows: list[tuple[str, list[float]]], num_bytes: int) -> None:
    copy_ms = statistics.median(rows[-1][1]) * 1e3
    raw_ms = statistics.median(rows[0][1]) * 1e3
    print(
        f"payload: {TOKENS} tokens x {(1 + NUM_DEEPSTACK) * OUT_HIDDEN} bf16 = "
        f"{num_bytes / 2**20:.1f} MiB; {len(rows[0][1])} timed calls each, after 3 warm-up"
    )
    print(f"{'method':<18}{'median ms':>10}{'min ms':>9}{'GB/s':>8}{'x copy':>9}{'x raw gRPC':>12}")
    for name, times in rows:
        med, best = statistics.median(times) * 1e3, min(times) * 1e3
        print(
            f"{name:<18}{med:>10.2f}{best:>9.2f}{num_bytes / med / 1e6:>8.2f}"
            f"{med / copy_ms:>9.1f}{med / raw_ms:>12.2f}"
        )
    medians = {name: statistics.median(times) for name, times in rows}
    ratio = medians["shared memory"] / medians["gRPC inline"]
    print(f"shared memory / gRPC inline: {ratio:.2f}x")


def run(args: argparse.Namespace, workdir: Path) -> None:
    from scripts.testkit.launch import ServiceProcess, start_encode
    from shared.wire.units import parse_bytes

    chunk = parse_bytes(args.chunk_bytes)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        print("writing the benchmark checkpoint ...", flush=True)
        make_checkpoint(model_dir)
    num_bytes = TOKENS * (1 + NUM_DEEPSTACK) * OUT_HIDDEN * 2
    encode_args = [
        "--dtype",
        "bfloat16",
        "--cache-memory",
        "256MiB",
        "--log-level",
        "WARNING",
        "--chunk-bytes",
        str(chunk),
    ]
    raw_args = ["--serve-raw", "--num-bytes", str(num_bytes), "--chunk-bytes", str(chunk)]
    raw = ServiceProcess("raw", raw_args, workdir, module="bench.transfer")
    encode = None
    try:
        encode, address = start_encode(model_dir, workdir, encode_args)
        raw_address = f"127.0.0.1:{raw.ports(60)['port']}"
        data = image_bytes()
        rows, results = asyncio.run(
            measure(address, raw_address, data, args.repeats, num_bytes, chunk)
        )
        link = results["gloo link"]
        if link.shape != (TOKENS, (1 + NUM_DEEPSTACK) * OUT_HIDDEN) or link.dtype != torch.bfloat16:
            raise RuntimeError(f"unexpected payload {tuple(link.shape)} {link.dtype}")
        if not all(torch.equal(t, link) for t in results.values()):
            raise RuntimeError("the transports delivered different bytes")
        print(
            f"torch {torch.__version__}, grpcio {grpc.__version__}, "
            f"{os.cpu_count()} CPUs, chunk {chunk // 1024} KiB"
        )
        report(rows, num_bytes)
    finally:
        if encode is not None:
            encode.stop()
        raw.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--chunk-bytes", default="1MiB")
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (model, logs)")
    p.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_raw:
        serve_raw(args.port_file, args.num_bytes, int(args.chunk_bytes))
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="splitvl-transfer-") as tmp:
            run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
