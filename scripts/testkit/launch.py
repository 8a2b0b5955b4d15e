"""Starting the services as child processes: one launcher for tests, benchmarks and the demo.

Every port is chosen by the service itself (port 0) and read back from its --port-file; every
wait has a timeout; `stop` sends SIGTERM, then SIGKILL, so no process outlives its owner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# Intra-op threads of every launched service. CPU kernels may split a reduction differently at
# another thread count (oneDNN's GEMMs on AVX512 machines do), so an in-process reference that
# must equal a service bit for bit runs with the same count (`service_threads`).
SERVICE_THREADS = 1


class ServiceError(RuntimeError):
    """A service did not start in time or exited early; the message ends with its log tail."""


class ServiceProcess:
    """One `python -m services.<name>` (or `module`) process with its port file and log.

    `log_path` None lets the service log to this process's terminal. `new_session` keeps
    Ctrl-C in the terminal away from it, so its owner stops it in order instead.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        workdir: Path,
        log_path: Path | None | bool = True,
        env: dict[str, str] | None = None,
        new_session: bool = False,
        module: str | None = None,
        label: str | None = None,
    ) -> None:
        self.name = name
        label = label or name  # names the port and log files: replicas of a service differ
        self.port_file = workdir / f"{label}.ports.json"
        self.log_path = workdir / f"{label}.log" if log_path is True else (log_path or None)
        self.port_file.unlink(missing_ok=True)
        # One intra-op thread unless told otherwise: tests and the demo run several services on
        # few cores, where OpenMP spin-waiting threads of one starve the others.
        threads = str(SERVICE_THREADS)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(env or {})}
        self._log = self.log_path.open("w") if self.log_path is not None else None
        command = [
            sys.executable,
            "-m",
            module or f"services.{name}",
            *args,
            "--port-file",
            str(self.port_file),
        ]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def ports(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        """The port file's content, once the service has written it."""
        deadline = time.monotonic() + timeout_s
        while not self.port_file.is_file():
            if not self.alive():
                raise ServiceError(
                    f"{self.name} exited with {self.process.returncode}{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} wrote no port file in {timeout_s:.0f} s{self.log_tail()}"
                )
            time.sleep(0.05)
        return json.loads(self.port_file.read_text())

    def log(self) -> str:
        """Everything the service logged so far (empty when it logs to the terminal)."""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, num_chars: int = 4000) -> str:
        text = self.log()
        return f"; log {self.log_path}:\n{text[-num_chars:]}" if text else ""

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.process.returncode


def grpc_health(address: str, service: str = "", timeout_s: float = 5.0) -> int:
    """The grpc.health.v1 status of `service` at `address` (raises grpc.RpcError if down)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=timeout_s).status


def _poll(ready, what: str, timeout_s: float, process: ServiceProcess | None) -> None:
    """Call `ready()` until it is true; fail when `process` exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process is not None and not process.alive():
            raise ServiceError(
                f"{process.name} exited with {process.process.returncode}{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} after {timeout_s:.0f} s")
        time.sleep(0.1)


def wait_grpc_serving(
    address: str,
    timeout_s: float = START_TIMEOUT_S,
    service: str = "",
    process: ServiceProcess | None = None,
) -> None:
    """Poll grpc.health.v1 until `service` is SERVING (fails early if `process` exits)."""

    def ready() -> bool:
        try:
            return grpc_health(address, service, 2) == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    _poll(ready, f"{address} not SERVING", timeout_s, process)


def wait_http_healthy(
    base_url: str, timeout_s: float = START_TIMEOUT_S, process: ServiceProcess | None = None
) -> None:
    """Poll GET /health until it answers 200 (fails early if `process` exits)."""

    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _poll(ready, f"{base_url} not healthy", timeout_s, process)


def start_encode(
    model_dir: Path, workdir: Path, extra_args: list[str] = (), name: str = "encode", **kw
) -> tuple[ServiceProcess, str]:
    """An encode replica on 127.0.0.1; returns it and its host:port once SERVING."""
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", *extra_args]
    proc = ServiceProcess("encode", args, workdir, label=name, **kw)
    try:
        address = f"127.0.0.1:{proc.ports()['port']}"
        wait_grpc_serving(address, process=proc)
    except BaseException:
        tail = proc.log_tail()
        proc.stop()
        raise ServiceError(f"encode service did not start{tail}") from None
    return proc, address


def start_language(
    model_dir: Path, workdir: Path, extra_args: list[str], name: str = "language", **kw
) -> tuple[ServiceProcess, str, str | None]:
    """A language service on 127.0.0.1; returns it, its base URL and gRPC address (if any)
    once healthy. HTTP and gRPC ports default to 0 unless `extra_args` set them."""
    args = ["--model", str(model_dir), "--host", "127.0.0.1"]
    if "--port" not in extra_args:
        args += ["--port", "0"]
    if "--grpc-port" not in extra_args:
        args += ["--grpc-port", "0"]
    proc = ServiceProcess("language", [*args, *extra_args], workdir, label=name, **kw)
    try:
        ports = proc.ports()
        base_url = f"http://127.0.0.1:{ports['http_port']}"
        wait_http_healthy(base_url, process=proc)
    except BaseException:
        tail = proc.log_tail()
        proc.stop()
        raise ServiceError(f"language service did not start{tail}") from None
    grpc_port = ports.get("grpc_port")
    return proc, base_url, f"127.0.0.1:{grpc_port}" if grpc_port else None


@contextmanager
def service_threads():
    """Run the block with the launched services' intra-op thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(SERVICE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
