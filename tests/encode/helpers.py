"""Test helpers: synthetic images, the in-process reference encoder and encode service processes."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from scripts.testkit.launch import (
    ServiceProcess,
    grpc_health,
    service_threads,
    wait_grpc_serving,
)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A random-noise RGB PNG (noise, so every seed gives different embeddings)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's signature."""
    data = bytearray(png_bytes(1, 1, 0))
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", then width and height (big-endian).
    if data[12:16] != b"IHDR":
        raise RuntimeError("unexpected PNG layout")
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


class Reference:
    """The vision tower run in-process on one image: what the service must deliver."""

    def __init__(self, model_dir: Path):
        from shared.model.loader import load_vision_model
        from shared.model.processing import load_image_processor_config

        self.model = load_vision_model(model_dir, dtype=torch.float32)
        self.processor = load_image_processor_config(model_dir)

    def preprocess(self, data: bytes, max_pixels: int | None = None):
        from shared.model.processing import decode_image, preprocess_image

        cfg = self.processor.with_pixel_limits(max_pixels=max_pixels)
        return preprocess_image(decode_image(data), cfg)

    @torch.inference_mode()
    def encode(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        pixel_values, grid = self.preprocess(data, max_pixels)
        with service_threads():  # the services' thread count, so results match bit for bit
            return self.model(pixel_values, torch.tensor([grid]))


class EncodeProcess:
    """`python -m services.encode` on 127.0.0.1 with a metrics port, ports picked by the OS."""

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        *extra_args: str,
        name: str = "encode",
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.model_dir = model_dir
        self.workdir = workdir
        self.name = name
        self.extra_args = extra_args
        self.credentials = credentials  # a TLS replica is polled over TLS
        self.service: ServiceProcess | None = None
        self.port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self):
        return self.service.process

    def start(self) -> EncodeProcess:
        """Launch without waiting (so several replicas start in parallel)."""
        args = [
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            *self.extra_args,
        ]
        self.service = ServiceProcess("encode", args, self.workdir, label=self.name)
        return self

    def wait_serving(self, timeout_s: float = 60.0) -> EncodeProcess:
        info = self.service.ports(timeout_s)
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        if self.credentials is None:
            wait_grpc_serving(self.address, timeout_s, process=self.service)
            return self
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            if not self.service.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} is not SERVING{self.service.log_tail()}")
            time.sleep(0.1)

    def channel(self) -> grpc.Channel:
        """A blocking channel to the replica (over TLS when it has credentials)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def health(self, service: str = "") -> int:
        if self.credentials is None:
            return grpc_health(self.address, service)
        with self.channel() as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status

    def signal(self, sig: int) -> None:
        self.service.signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        return None if self.service is None else self.service.stop(timeout_s)

    def kill(self) -> None:
        if self.service is not None:
            self.service.kill()

    def log(self) -> str:
        return "" if self.service is None else self.service.log()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0
