"""Drain on SIGTERM and start-up failures, with real service processes."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from shared.wire.link import P2PLink, connect_store, transfer_tag
from tests.encode.helpers import EncodeProcess, png_bytes


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def test_sigterm_reports_not_serving_and_drains_before_exiting(tiny_vl_dir, tmp_path, reference):
    service = EncodeProcess(tiny_vl_dir, tmp_path, "--drain-timeout", "60").start()
    link = None
    try:
        service.wait_serving()
        data = png_bytes(120, 90, seed=31)
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.EncodeServiceStub(channel)
            offer = stub.OpenLink(pb.OpenLinkRequest(device="cpu"), timeout=10)
            store = connect_store(offer.store_host, offer.store_port, 10)
            link = P2PLink(offer.link_id, store, offer.rank, "cpu", 10, secret=offer.secret)
            request = pb.EncodeRequest(
                images=[pb.ImageInput(data=data)],
                transport=pb.TRANSPORT_LINK,
                link_id=offer.link_id,
            )
            [message] = list(stub.Encode(request, timeout=30))
            header = message.header  # its tensor waits on the service under header.ticket

            service.signal(signal.SIGTERM)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            _wait(lambda: service.health() == not_serving, 10, "NOT_SERVING")
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Encode(pb.EncodeRequest(images=[pb.ImageInput(data=data)]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in err.value.details()
            time.sleep(0.3)
            assert service.proc.poll() is None, "exited with a ticket still unredeemed"

            call = stub.Transfer(
                pb.TransferRequest(link_id=offer.link_id, tickets=[header.ticket]), timeout=30
            )
            assert next(call).ready.num_tensors == 1
            spec = (tuple(header.shape), torch.float32)
            [tensor] = link.recv([spec], [transfer_tag(header.ticket)])
            assert next(call).done.num_bytes == header.num_bytes
        assert torch.equal(tensor, reference.encode(data))
        assert service.proc.wait(30) == 0
        assert "draining 0 call(s), 1 ticket(s)" in service.log()
    finally:
        if link is not None:
            link.close()
        service.kill()


def test_a_model_that_cannot_load_exits_with_an_error(tiny_vl_dir, tmp_path):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((tiny_vl_dir / name).read_bytes())
    service = EncodeProcess(broken, tmp_path).start()
    try:
        assert service.proc.wait(60) == 1
    finally:
        service.kill()
    assert "could not load the model" in service.log()
    assert "no model.safetensors" in service.log()
    assert "Traceback" not in service.log()
