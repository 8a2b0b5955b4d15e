"""Helpers for the load, soak and fault tests: clusters of real processes, distinct images whose
answers are known, streamed requests counted one by one, and process / metrics sampling."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from scripts.testkit.launch import ServiceProcess, start_encode, start_language
from tests.e2e.support import data_url


@dataclass
class LoadCluster:
    """Encode replicas and a language service, with the addresses tests need."""

    language: ServiceProcess
    base_url: str
    grpc_address: str | None
    encodes: list[ServiceProcess] = field(default_factory=list)
    encode_addresses: list[str] = field(default_factory=list)
    encode_metrics_urls: list[str] = field(default_factory=list)

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.language, *self.encodes]


@contextmanager
def load_cluster(
    model: Path,
    workdir: Path,
    num_encode: int,
    language_args: Sequence[str],
    encode_args: Sequence[str] = (),
) -> Iterator[LoadCluster]:
    """`num_encode` replicas (each with /metrics) and one language service; all stopped after."""
    encodes, addresses, metrics = [], [], []
    try:
        for i in range(num_encode):
            proc, address = start_encode(
                model, workdir, ["--metrics-port", "0", *encode_args], name=f"encode{i}"
            )
            encodes.append(proc)
            addresses.append(address)
            metrics.append(f"http://127.0.0.1:{proc.ports()['metrics_port']}/metrics")
        args = [*(["--encode", ",".join(addresses)] if addresses else []), *language_args]
        language, base_url, grpc_address = start_language(model, workdir, args)
        try:
            yield LoadCluster(language, base_url, grpc_address, encodes, addresses, metrics)
        finally:
            language.stop()
    finally:
        for proc in encodes:
            proc.stop()


# -- images whose answers are known ----------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def perturbed(image: Image.Image, k: int) -> bytes:
    """The image with the lowest bit of one colour byte of one corner pixel flipped: new bytes
    (so a new content hash, so encoded again), the same picture to the model. `k` picks the
    pixel and channel; distinct `k` below 3 * 16 * 16 give distinct images."""
    copy = image.convert("RGB").copy()
    channel, position = k % 3, k // 3
    x, y = position % 16, (position // 16) % 16
    pixel = list(copy.getpixel((x, y)))
    pixel[channel] ^= 1
    copy.putpixel((x, y), tuple(pixel))
    return png(copy)


def base_cases(num: int, seed: int = 7) -> list[tuple[Image.Image, str]]:
    """(image, question) pairs of the shapes task, one question per image."""
    from scripts.shapes_vl.data import make_dataset

    return [(example.image, example.question) for example in make_dataset(seed, num)]


def chat_body(
    model: str, question: str, image: bytes | None, max_tokens: int = 24, stream: bool = True
) -> dict:
    content: list | str = question
    if image is not None:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": question},
        ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


# -- streamed requests, every outcome counted --------------------------------------------------


@dataclass
class StreamResult:
    """One streamed request: its text, finish reason, HTTP status and any error."""

    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    done: bool = False  # the stream ended with data: [DONE]
    error: str | None = None
    ttft_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and bool(self.finish_reason)


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None
) -> StreamResult:
    result = StreamResult()
    start = time.monotonic()
    try:
        async with client.stream("POST", url, json=body, headers=headers or {}) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:500]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]["message"]
                    continue
                for choice in event.get("choices", ()):
                    piece = choice.get("delta", {}).get("content") or ""
                    if piece and result.ttft_s is None:
                        result.ttft_s = time.monotonic() - start
                    result.text += piece
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def stream_many(
    url: str, bodies: Sequence[dict], headers: dict | None = None, timeout_s: float = 600.0
) -> list[StreamResult]:
    """All `bodies` at once, each on its own connection."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        jobs = [stream_chat(client, url, body, headers) for body in bodies]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout_s)


# -- process and metrics sampling ----------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def scrape(url: str) -> dict[str, float]:
    """Unlabelled Prometheus samples (labelled ones summed over their labels) by name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = None
        with suppress(Exception):
            value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout_s} s")
        time.sleep(poll_s)
