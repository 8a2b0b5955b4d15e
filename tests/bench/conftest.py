"""A splitvl cluster for the load generator's tests, and a fake server that misbehaves.

The cluster is an encode replica with its Prometheus port open and a language service on the
shipped `models/shapes-vl`, both real processes on 127.0.0.1 with ports chosen by the services.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.testkit.launch import REPO, ServiceProcess, start_encode, start_language

SHAPES_VL = REPO / "models" / "shapes-vl"
API_KEY = "bench-key"
LANGUAGE_ARGS = [
    "--api-key",
    API_KEY,
    "--max-model-len",
    "2048",
    "--kv-cache-memory",
    "128MiB",
    "--max-num-seqs",
    "32",
]


@dataclass(frozen=True)
class BenchCluster:
    """Where the running services answer."""

    base_url: str
    language_metrics_url: str
    encode_metrics_url: str
    api_key: str = API_KEY


def start_encode_with_metrics(model_dir: Path, workdir: Path) -> tuple[ServiceProcess, str, int]:
    """An encode replica serving /metrics; returns it, its gRPC address and its metrics port."""
    proc, address = start_encode(model_dir, workdir, ["--metrics-port", "0"])
    return proc, address, int(proc.ports()["metrics_port"])


@pytest.fixture(scope="session")
def bench_cluster(tmp_path_factory) -> Iterator[BenchCluster]:
    if not (SHAPES_VL / "config.json").is_file():
        pytest.skip(f"the shipped model {SHAPES_VL} is missing")
    workdir = tmp_path_factory.mktemp("bench_cluster")
    encode, encode_address, metrics_port = start_encode_with_metrics(SHAPES_VL, workdir)
    try:
        args = ["--encode", encode_address, *LANGUAGE_ARGS]
        language, base_url, _grpc = start_language(SHAPES_VL, workdir, args)
        try:
            yield BenchCluster(
                base_url, f"{base_url}/metrics", f"http://127.0.0.1:{metrics_port}/metrics"
            )
        finally:
            language.stop()
    finally:
        encode.stop()


# The fake server answers by the prompt's text, so each request's fate is known in advance.
FAKE_MODES = {
    "http500": "the fake server is on fire",
    "sse_error": "engine failed mid-stream",
    "event_error": "error named by the SSE event field",
    "broken": "",  # the connection drops inside the chunked body
    "ok": "",
}


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


def _chunk(text: str) -> dict:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _respond(mode: str, writer: asyncio.StreamWriter) -> None:
    if mode == "http500":
        body = json.dumps(
            {
                "error": {
                    "message": FAKE_MODES[mode],
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            }
        ).encode()
        writer.write(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        return
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    for text in ("a", " b"):
        writer.write(_http_chunk(_sse(_chunk(text))))
        await writer.drain()
        await asyncio.sleep(0.005)
    if mode == "broken":
        return  # no terminating chunk: the peer closed mid-body
    if mode == "sse_error":
        writer.write(_http_chunk(_sse({"error": {"message": FAKE_MODES[mode], "code": 500}})))
    elif mode == "event_error":
        writer.write(
            _http_chunk(
                b"event: error\ndata: "
                + json.dumps({"message": FAKE_MODES[mode]}).encode()
                + b"\n\n"
            )
        )
    else:
        writer.write(_http_chunk(_sse(_chunk(" c"))))
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        writer.write(
            _http_chunk(_sse({"object": "chat.completion.chunk", "choices": [], "usage": usage}))
        )
    writer.write(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
        length = int(headers.get("Content-Length") or headers.get("content-length") or 0)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if request_line.startswith("GET /v1/models"):
            data = json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
        else:
            text = json.dumps(body.get("messages", ""))
            mode = next((m for m in FAKE_MODES if m in text), "ok")
            await _respond(mode, writer)
        await writer.drain()
    finally:
        writer.close()


@pytest.fixture
def fake_server() -> Iterator[str]:
    """A misbehaving OpenAI-style server on a loopback port; yields its base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    if not started.wait(10):
        raise TimeoutError("fake server did not start")
    try:
        yield f"http://127.0.0.1:{holder['port']}"
    finally:

        async def close() -> None:
            holder["server"].close()
            await holder["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
