"""One streamed OpenAI request, timed the way `vllm bench serve` times it.

TTFT is the time to the first chunk that carries text (content, or reasoning content for
reasoning models); ITL is the gap between successive such chunks; E2EL ends with the stream. The
output token count is the server's `usage.completion_tokens` when it sends one (else the number
of text chunks). Anything but a clean stream (HTTP error, `error` event, broken connection,
timeout) makes the request a failure that carries the server's message.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from bench.serve.datasets import BenchRequest

MAX_ERROR_CHARS = 1000


@dataclass
class RequestResult:
    """What one request measured; times in seconds, `start` from the benchmark's start."""

    index: int
    num_images: int = 0
    start: float = 0.0
    success: bool = False
    ttft: float | None = None
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # text chunks, from benchmark start
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True)
class RequestOptions:
    """Fields every request shares."""

    url: str
    model: str
    chat: bool
    headers: dict[str, str]
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 600.0
    extra_body: dict | None = None


def build_payload(request: BenchRequest, options: RequestOptions) -> dict:
    """The JSON body: streamed, with usage, and vLLM's `ignore_eos` extension when asked."""
    body: dict = {
        "model": options.model,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.chat:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if options.ignore_eos:
        body["ignore_eos"] = True
    body.update(options.extra_body or {})
    return body


class StreamError(Exception):
    """The server reported an error inside the stream."""


async def send_request(
    client: httpx.AsyncClient,
    request: BenchRequest,
    options: RequestOptions,
    index: int,
    origin: float,
) -> RequestResult:
    """Send one request and time it; `origin` is the benchmark's perf_counter() start."""
    result = RequestResult(index=index, num_images=request.num_images)
    payload = build_payload(request, options)  # before the clock starts, as vLLM does
    started = time.perf_counter()
    result.start = started - origin
    try:
        async with asyncio.timeout(options.timeout_s):
            await _stream(client, payload, options, result, origin)
        result.success = True
    except TimeoutError:
        result.error = f"timeout: no complete response within {options.timeout_s:g} s"
    except httpx.TimeoutException as exc:
        result.error = f"timeout: {type(exc).__name__} after {options.timeout_s:g} s"
    except httpx.TransportError as exc:
        result.error = f"connection error: {type(exc).__name__}: {exc}"
    except StreamError as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2el = time.perf_counter() - started
    if result.ttft is None and result.success:
        result.ttft = result.e2el  # no text chunk: the whole answer came at the end
    if not result.usage_reported:  # a server without include_usage: count what we saw
        result.output_tokens = len(result.chunk_times)
        result.prompt_tokens = request.prompt_len_estimate
    result.error = result.error[:MAX_ERROR_CHARS]
    return result


async def _stream(
    client: httpx.AsyncClient,
    payload: dict,
    options: RequestOptions,
    result: RequestResult,
    origin: float,
) -> None:
    started = origin + result.start
    async with client.stream("POST", options.url, json=payload, headers=options.headers) as resp:
        if resp.status_code >= 400:
            body = (await resp.aread()).decode(errors="replace")
            raise StreamError(f"HTTP {resp.status_code}: {error_message(body)}")
        last: float | None = None
        async for event, data in sse_events(resp.aiter_lines()):
            if data.strip() == "[DONE]":
                break
            now = time.perf_counter()
            text = _handle_event(event, data, result)
            if not text:
                continue
            if last is None:
                result.ttft = now - started
            else:
                result.itl.append(now - last)
            last = now
            result.chunk_times.append(now - origin)
            result.generated_text += text


def _handle_event(event: str, data: str, result: RequestResult) -> str:
    """Record usage from one event and return the text it carries; raise on an error event."""
    try:
        body = json.loads(data)
    except json.JSONDecodeError:
        raise StreamError(f"stream error: event data is not JSON: {data[:200]!r}") from None
    if event == "error" or (isinstance(body, dict) and "error" in body):
        raise StreamError(f"stream error: {error_message(data)}")
    if not isinstance(body, dict):
        return ""
    usage = body.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.usage_reported = True
    choices = body.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:  # chat; reasoning models stream their thinking first
        delta = choice["delta"] or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        return text or ""
    return choice.get("text") or ""


async def sse_events(lines):
    """(event name, data) pairs of a server-sent event stream; multi-line data is joined."""
    event, data = "", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


def error_message(body: str) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}}), else the raw text."""
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:MAX_ERROR_CHARS] or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            if message:
                return str(message)
        elif isinstance(error, str):
            return error
        if isinstance(parsed.get("detail"), str):
            return parsed["detail"]
    return body.strip()[:MAX_ERROR_CHARS]
