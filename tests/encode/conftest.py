"""Fixtures of the encode tests: the in-process reference tower and a shared service process."""

from __future__ import annotations

import pytest

from tests.encode.helpers import EncodeProcess, Reference


@pytest.fixture(scope="session")
def reference(tiny_vl_dir) -> Reference:
    return Reference(tiny_vl_dir)


@pytest.fixture(scope="module")
def encode_service(tiny_vl_dir, tmp_path_factory):
    """One encode replica for a test module: fp32 tiny model, at most 8 images per request,
    4 KiB chunks for callers that do not ask for larger ones."""
    workdir = tmp_path_factory.mktemp("encode")
    args = ("--max-images-per-request", "8", "--batch-wait-ms", "20", "--chunk-bytes", "4KiB")
    service = EncodeProcess(tiny_vl_dir, workdir, *args)
    try:
        yield service.start().wait_serving()
    finally:
        service.stop()
