"""The committed gRPC modules are what `make proto` generates from the committed .proto files."""

from __future__ import annotations

import re

from proto.codegen import REPO_ROOT, generate, generated_files

# Lines naming the generator's version: they differ between grpcio-tools releases, not protos.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,)$", re.MULTILINE
)


def _normalized(text: str) -> str:
    return _VERSION_LINES.sub("", text)


def test_generated_code_is_up_to_date(tmp_path):
    fresh = generate(tmp_path)
    committed = generated_files(REPO_ROOT)
    assert fresh, "no .proto files were compiled"
    assert committed == fresh, "generated modules differ from the .proto files: run `make proto`"
    stale = [
        str(path)
        for path in fresh
        if _normalized((tmp_path / path).read_text()) != _normalized((REPO_ROOT / path).read_text())
    ]
    assert not stale, f"stale generated code in {stale}: run `make proto` and commit the result"


def test_encode_service_contract():
    from proto.splitvl.encode.v1 import encode_pb2

    service = encode_pb2.DESCRIPTOR.services_by_name["EncodeService"]
    assert service.full_name == "splitvl.encode.v1.EncodeService"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods["Encode"] == (False, True)
    assert methods["GetInfo"] == (False, False)
    header = encode_pb2.ImageHeader.DESCRIPTOR.fields_by_name
    for field in ("grid_thw", "num_tokens", "dtype", "shape", "content_hash", "ticket"):
        assert field in header
