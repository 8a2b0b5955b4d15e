"""The encode and language services as real processes on 127.0.0.1, for end-to-end tests.

Every port is chosen by the service itself (port 0) and read back from its --port-file; every
wait has a timeout; `stop` terminates, then kills, so no process outlives its fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


class ServiceProcess:
    """One `python -m services.<name>` process with its log file and port file."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.port_file = workdir / f"{name}.ports.json"
        self.log_path = workdir / f"{name}.log"
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", f"services.{name}", *args]
        command += ["--port-file", str(self.port_file)]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def ports(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        """The port file's content, once the service has written it."""
        deadline = time.monotonic() + timeout_s
        while not self.port_file.is_file():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} wrote no port file in {timeout_s} s")
            time.sleep(0.05)
        return json.loads(self.port_file.read_text())

    def log_tail(self, num_chars: int = 4000) -> str:
        """The end of the service's output, for failure messages."""
        self._log.flush()
        return self.log_path.read_text()[-num_chars:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()


def wait_grpc_serving(address: str, timeout_s: float = START_TIMEOUT_S, service: str = "") -> None:
    """Poll grpc.health.v1 until `service` is SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s} s")
            time.sleep(0.1)


def wait_http_healthy(base_url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll GET /health until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} not healthy after {timeout_s} s")
        time.sleep(0.1)


def start_encode(model_dir: Path, workdir: Path) -> tuple[ServiceProcess, str]:
    """An encode replica; returns it and its host:port once SERVING."""
    proc = ServiceProcess("encode", ["--model", str(model_dir), "--port", "0"], workdir)
    try:
        address = f"127.0.0.1:{proc.ports()['port']}"
        wait_grpc_serving(address)
    except BaseException:
        log = proc.log_tail()
        proc.stop()
        raise RuntimeError(f"encode service did not start:\n{log}") from None
    return proc, address


def start_language(
    model_dir: Path, workdir: Path, extra_args: list[str]
) -> tuple[ServiceProcess, str, str]:
    """A language service; returns it, its base URL and its gRPC address once healthy."""
    args = ["--model", str(model_dir), "--port", "0", "--grpc-port", "0", *extra_args]
    proc = ServiceProcess("language", args, workdir)
    try:
        ports = proc.ports()
        base_url = f"http://127.0.0.1:{ports['http_port']}"
        wait_http_healthy(base_url)
    except BaseException:
        log = proc.log_tail()
        proc.stop()
        raise RuntimeError(f"language service did not start:\n{log}") from None
    return proc, base_url, f"127.0.0.1:{ports['grpc_port']}"
