"""The model-contract handshake: the language service refuses encode replicas of another model,
at start-up and when a replica comes back changed."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from scripts.testkit.launch import ServiceProcess
from services.language.encoder.client import EncodeClient, EncodeClientConfig
from shared.model.fingerprint import vision_fingerprint
from shared.wire.errors import IncompatibleEncoderError
from shared.wire.images import ImageRef
from shared.wire.info import EncoderContract
from tests.e2e.support import servable_copy
from tests.encode.helpers import EncodeProcess, png_bytes
from tests.tiny import make_vl_checkpoint


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A tiny checkpoint of the same shape as the shared one, with other weights."""
    path = tmp_path_factory.mktemp("other_vl")
    make_vl_checkpoint(path, seed=1)
    return path


def _contract(model_dir) -> EncoderContract:
    return EncoderContract(vision_fingerprint(model_dir), 64, 2, "float32", 16, 2, 2)


def test_fingerprints_tell_weights_apart_and_ignore_copies(tiny_vl_dir, other_checkpoint, tmp_path):
    ours, theirs = vision_fingerprint(tiny_vl_dir), vision_fingerprint(other_checkpoint)
    assert len(ours) == 16 and ours != theirs
    assert vision_fingerprint(servable_copy(tiny_vl_dir, tmp_path / "copy")) == ours


def test_language_service_refuses_an_encode_replica_of_another_checkpoint(
    tiny_vl_dir, other_checkpoint, tmp_path
):
    encode = EncodeProcess(other_checkpoint, tmp_path, name="other").start().wait_serving()
    try:
        model = servable_copy(tiny_vl_dir, tmp_path / "served")
        args = ["--model", str(model), "--port", "0", "--encode", encode.address]
        language = ServiceProcess("language", args, tmp_path)
        try:
            status = language.process.wait(120)
        finally:
            language.stop()
    finally:
        encode.stop()
    log = language.log()
    assert status != 0
    line = next(x for x in log.splitlines() if "cannot start the language service" in x)
    ours, theirs = vision_fingerprint(tiny_vl_dir), vision_fingerprint(other_checkpoint)
    assert re.search(rf"checkpoint_id '{theirs}' != '{ours}'", line), line
    assert "Traceback" not in log


def test_a_replica_that_comes_back_changed_is_not_used(tiny_vl_dir, other_checkpoint, tmp_path):
    good = EncodeProcess(tiny_vl_dir, tmp_path, name="good").start()
    flaky = EncodeProcess(tiny_vl_dir, tmp_path, name="flaky").start()
    good.wait_serving()
    flaky.wait_serving()
    port = flaky.port
    images = [ImageRef(png_bytes(64, 64, seed=40 + i)) for i in range(6)]

    async def run():
        config = EncodeClientConfig(
            (good.address, flaky.address), expected=_contract(tiny_vl_dir), cooldown_s=0.1
        )
        client = EncodeClient(config)
        try:
            infos = await client.check_replicas(10)
            first = await client.encode(images)
            flaky.kill()  # comes back on the same port, serving other weights
            changed = EncodeProcess(
                other_checkpoint, tmp_path, "--port", str(port), name="changed"
            ).start()
            changed.port = port
            try:
                await asyncio.to_thread(changed.wait_serving)
                second = await client.encode(images)
                with pytest.raises(IncompatibleEncoderError):
                    await client.check_replicas(10)
            finally:
                changed.stop()
            return infos, first, second
        finally:
            await client.close()

    try:
        infos, first, second = asyncio.run(run())
    finally:
        good.stop()
        flaky.stop()
    assert set(infos) == {good.address, flaky.address}
    assert {image.source for image in first} == {good.address, flaky.address}
    assert {image.source for image in second} == {good.address}
    # The same weights: the same embeddings, up to the batch composition (the second call
    # batches all six images on one replica, and CPU GEMMs may block other shapes differently)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a.packed, b.packed, rtol=0, atol=1e-5)
