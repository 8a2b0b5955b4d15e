"""What the end-to-end checks share: the repository root, a chat call, the error they raise."""

from __future__ import annotations

import json
import urllib.request
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 120.0


class CheckError(RuntimeError):
    """The cluster answered wrongly, lost a request, or could not be reached."""


@cache
def model_name(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as reply:  # noqa: S310
        return json.load(reply)["data"][0]["id"]


def post_chat(base_url: str, messages: list[dict], max_tokens: int = 4) -> dict:
    """One whole (unstreamed) chat completion."""
    body = json.dumps(
        {"model": model_name(base_url), "messages": messages, "max_tokens": max_tokens}
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:  # noqa: S310
        return json.load(reply)
