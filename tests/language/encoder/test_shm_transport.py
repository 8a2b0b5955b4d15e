"""The shared-memory transport against real encode processes: the same embeddings as inline,
views of the pool and no copy, a full pool or a replica that cannot map it served inline, and
no /dev/shm file left behind when either side is killed."""

from __future__ import annotations

import asyncio
import gc
import glob
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.language.encoder.client import EncodeClient, EncodeClientConfig
from shared.wire.images import ImageRef
from tests.encode.helpers import EncodeProcess, metric_value, png_bytes
from tests.language.encoder.test_client import _metrics

REPO = Path(__file__).resolve().parents[3]


def _pool_files() -> list[str]:
    return glob.glob("/dev/shm/splitvl-ipc-*")


def _client(service, **kw) -> EncodeClient:
    return EncodeClient(EncodeClientConfig((service.address,), transport="ipc", **kw))


def test_shared_memory_delivers_the_inline_embeddings_as_pool_views(encode_service, reference):
    images = [ImageRef(png_bytes(w, h, seed=w)) for w, h in ((200, 120), (64, 48), (96, 300))]

    async def run():
        client = _client(encode_service)
        try:
            got = []
            for ref in images:  # one at a time: alone in its vision forward, as the reference
                got += await client.encode([ref])
            pool = client._replicas[0].shm.pool
            return got, pool, pool.num_live
        finally:
            await client.close()

    got, pool, live = asyncio.run(run())
    for ref, image in zip(images, got, strict=True):
        assert torch.equal(image.packed, reference.encode(ref.data))
    assert live == 3  # each image a region of the pool, not a copy of its own
    assert _pool_files() == []  # the name went once the replica mapped it
    del got, image
    gc.collect()
    assert pool.num_live == 0


def test_a_full_pool_sends_the_image_inline(encode_service, reference):
    data = png_bytes(256, 256, seed=3)

    async def run():
        client = _client(encode_service, ipc_pool_bytes=4096)  # smaller than the tensor
        try:
            [image] = await client.encode([ImageRef(data)])
            return image, client._replicas[0].shm.inline_fallbacks
        finally:
            await client.close()

    image, fallbacks = asyncio.run(run())
    assert fallbacks == 1 and torch.equal(image.packed, reference.encode(data))


CLIENT = """
import asyncio, sys
from services.language.encoder.client import EncodeClient, EncodeClientConfig
from shared.wire.images import ImageRef
from tests.encode.helpers import png_bytes

async def main():
    client = EncodeClient(EncodeClientConfig((sys.argv[1],), transport="ipc"))
    held = await client.encode([ImageRef(png_bytes(64, 64, seed=1))])
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _pools_mapped(service) -> float:
    return metric_value(_metrics(service), "splitvl_encode_shm_pools")


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_killing_the_language_side_leaves_no_shared_memory(encode_service):
    before = _pools_mapped(encode_service)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, encode_service.address],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert _pools_mapped(encode_service) == before + 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert _wait(lambda: _pools_mapped(encode_service) == before)  # the lease ended: unmapped
    assert _pool_files() == []


def test_killing_the_encode_side_leaves_no_shared_memory_and_the_views_stay(
    tiny_vl_dir, tmp_path, reference
):
    service = EncodeProcess(tiny_vl_dir, tmp_path).start().wait_serving()
    data = png_bytes(120, 80, seed=9)

    async def run():
        client = _client(service)
        try:
            [image] = await client.encode([ImageRef(data)])
            service.proc.send_signal(signal.SIGKILL)
            service.proc.wait(timeout=10)
            return image  # a view of the pool, which outlives the replica
        finally:
            await client.close()

    try:
        image = asyncio.run(run())
    finally:
        service.stop()
    assert torch.equal(image.packed, reference.encode(data))
    assert _pool_files() == []


@pytest.mark.parametrize("transport", ["ipc", "auto"])
def test_ipc_and_auto_use_shared_memory_on_a_cpu(encode_service, transport):
    async def run():
        client = EncodeClient(EncodeClientConfig((encode_service.address,), transport=transport))
        try:
            await client.encode([ImageRef(png_bytes(64, 64, seed=2))])
            return client._replicas[0].shm
        finally:
            await client.close()

    receiver = asyncio.run(run())
    assert receiver is not None and receiver.pool is not None and receiver.unusable is None
