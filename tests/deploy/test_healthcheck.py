"""deploy/healthcheck.py against real gRPC health and HTTP servers on loopback (port 0)."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def probe(*args: str) -> int:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, timeout=30
    ).returncode


@pytest.fixture
def grpc_health() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_health() -> Iterator[tuple[str, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_grpc_serving_not_serving_and_down(grpc_health):
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe("grpc", address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading, or draining
    assert probe("grpc", address) == 1


def test_grpc_nothing_listening():
    with socket.socket() as sock:  # a port that was free a moment ago; nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe("grpc", f"127.0.0.1:{port}") == 1


def test_http_ok_error_and_usage(http_health):
    url, handler = http_health
    assert probe("http", url) == 0
    handler.status = 503
    assert probe("http", url) == 1
    assert probe("tcp", url) == 2
