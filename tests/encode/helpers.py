"""Test helpers: synthetic images, the in-process reference encoder and encode service processes."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        from shared.model.processing import load_image_processor_config
        from shared.model.vision import Qwen3VLVisionModel

        self.model = Qwen3VLVisionModel.from_pretrained(model_dir, dtype=torch.float32)
        self.processor = load_image_processor_config(model_dir)

    def preprocess(self, data: bytes, max_pixels: int | None = None):
        from shared.model.processing import decode_image, preprocess_image

        cfg = self.processor.with_pixel_limits(max_pixels=max_pixels)
        return preprocess_image(decode_image(data), cfg)

    @torch.inference_mode()
    def encode(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        pixel_values, grid = self.preprocess(data, max_pixels)
        return self.model(pixel_values, torch.tensor([grid]))


class EncodeProcess:
    """`python -m services.encode` on 127.0.0.1, a port picked by the OS, stopped in teardown."""

    def __init__(self, model_dir: Path, workdir: Path, *extra_args: str, name: str = "encode"):
        self.model_dir = model_dir
        self.port_file = workdir / f"{name}.port.json"
        self.log_path = workdir / f"{name}.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EncodeProcess:
        """Launch without waiting (so several replicas start in parallel)."""
        self.port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "services.encode",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--metrics-port",
            "0",
            *self.extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout_s: float = 60.0) -> EncodeProcess:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no port file after {timeout_s}s:\n{self.log()}")
            time.sleep(0.05)
        info = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout_s}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=service)
            return stub.Check(request, timeout=5).status

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"encode service exited with {self.proc.returncode}:\n{self.log()}")


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0
