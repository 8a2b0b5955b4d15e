"""Text-only requests never touch the encode service: they succeed while it is unreachable."""

from __future__ import annotations

import socket

import httpx

from scripts.testkit.launch import start_language
from tests.e2e.checks import chat_messages
from tests.e2e.support import png_bytes


def _dead_address() -> str:
    # A port that was free a moment ago and has nothing listening on it
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_text_only_requests_work_without_the_encode_service(e2e_model, tmp_path):
    args = [
        "--encode",
        _dead_address(),
        "--served-model-name",
        "m",
        "--max-model-len",
        "1024",
        "--kv-cache-memory",
        "32MiB",
    ]
    language, base_url, _ = start_language(e2e_model.path, tmp_path, args)
    try:
        url = f"{base_url}/v1/chat/completions"
        text = {"model": "m", "messages": chat_messages("Hi!"), "max_tokens": 4}
        response = httpx.post(url, json=text, timeout=60)
        assert response.status_code == 200, response.text
        image = {**text, "messages": chat_messages("What is it?", png_bytes(32, 32))}
        response = httpx.post(url, json=image, timeout=120)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "encode_unavailable"
        assert "Retry-After" in response.headers
        assert httpx.post(url, json=text, timeout=60).status_code == 200
    finally:
        language.stop()
