"""The request gate: an ASGI middleware that runs before FastAPI parses anything.

It refuses with OpenAI error JSON: a wrong or missing API key on /v1 routes (401, even when the
body is not JSON), new work while the server drains (503), a body over the size limit (413),
JSON nested too deeply or holding too many values (400 / 413), and text that is not UTF-8 or
holds unpaired surrogates (400: the tokenizer and the templates work on Unicode text only). It
also turns a failure that escapes a route into a 500 answer on the same connection: raised
further, Starlette would re-raise it to the server, which closes the connection, and a client
with a keep-alive pool would see its next request reset.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

from fastapi.responses import JSONResponse

from services.common.auth import bearer_matches
from services.language.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

logger = logging.getLogger(__name__)

# Deeper JSON is refused before parsing: nothing in the API nests this far, and deep nesting
# reaches recursive code (the JSON parser, pydantic, grammar compilers) that can exhaust the stack.
MAX_JSON_DEPTH = 64
# Bounds on the number of containers and strings, so that a body within the byte limit cannot
# cost seconds of parsing and gigabytes of objects (a chat request has a few hundred of each).
MAX_JSON_CONTAINERS = 100_000
MAX_JSON_QUOTES = 2_000_000
# Routes that stay open while draining: probes, metrics, the version.
_DRAIN_OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version", "/openapi.json"})
_STRUCTURAL = re.compile(rb'[\[\]{}"\\]')


def json_shape_error(body: bytes) -> APIError | None:
    """Why `body` is refused before it is parsed (too deep, too many values), or None.

    Counting brackets is enough for nearly every request; only a body with more openers than the
    depth limit is scanned, skipping string contents (where brackets mean nothing)."""
    openers = body.count(b"[") + body.count(b"{")
    if openers > MAX_JSON_CONTAINERS or body.count(b'"') > MAX_JSON_QUOTES:
        return PayloadTooLargeError(
            f"request body holds too many JSON values (over {MAX_JSON_CONTAINERS} arrays and "
            f"objects or {MAX_JSON_QUOTES // 2} strings)"
        )
    if openers <= MAX_JSON_DEPTH:
        return None
    depth, in_string, skip = 0, False, -1
    for match in _STRUCTURAL.finditer(body):
        at = match.start()
        if at == skip:  # the character after a backslash inside a string
            continue
        char = body[at]
        if in_string:
            if char == 0x5C:  # backslash
                skip = at + 1
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return BadRequestError(
                    f"request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} "
                    "levels"
                )
        elif char in (0x5D, 0x7D):
            depth -= 1
    return None


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff); paired ones are one character after
# parsing, a lone one is a string no UTF-8 codec (tokenizers included) can encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def text_error(body: bytes) -> APIError | None:
    """Why `body` is not UTF-8 JSON text every string of which is Unicode, or None."""
    try:
        body.decode("utf-8")  # strict: raw surrogates and stray bytes fail here
    except UnicodeDecodeError as exc:
        return BadRequestError(
            f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason}); send JSON "
            "encoded as UTF-8"
        )
    if _SURROGATE_ESCAPE.search(body) is None:
        return None  # the common case: no escape that could leave a lone surrogate
    try:
        parsed = json.loads(body)
    except ValueError:
        return None  # not JSON at all: the route's parser says so
    if _has_lone_surrogate(parsed):
        return BadRequestError(
            "request body has a string with an unpaired UTF-16 surrogate escape (\\ud800 to "
            "\\udfff without its pair); strings must be valid Unicode"
        )
    return None


def body_error(body: bytes) -> APIError | None:
    """Why a request body is refused before it is parsed, or None."""
    return json_shape_error(body) or text_error(body)


class RequestGate:
    """ASGI middleware: API key on /v1 routes, the body size, shape and text limits, 503 for new
    work while the server drains, and a 500 answer for a failure a route did not handle."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_request_bytes: int,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.draining = draining

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check(scope["path"], headers)
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(receive)
            if body is None and error is None:
                return  # the client went away while sending
            receive = _replay(body, receive)
        if error is not None:
            return await _respond(error, scope, receive, send)
        await self._guarded(scope, receive, send)

    async def _guarded(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # The traceback goes to the log only; the client gets a generic message
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _respond(InternalServerError("internal server error"), scope, receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.draining() and path not in _DRAIN_OPEN_PATHS:
            return ServiceUnavailableError(
                "the server is shutting down and takes no new requests; send them to another "
                "replica",
                code="shutting_down",
            )
        if self.api_key is not None and path.startswith("/v1/"):
            if not bearer_matches(headers.get("authorization"), self.api_key):
                return AuthenticationError(
                    "invalid or missing API key; send 'Authorization: Bearer <key>'"
                )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return PayloadTooLargeError(self._too_large(declared))
        return None

    def _too_large(self, size: str) -> str:
        return f"request body is {size} bytes, above the limit of {self.max_request_bytes}"

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        """The whole body (FastAPI reads it whole before parsing anyway), or the reason it is
        refused; (None, None) when the client disconnected."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_request_bytes:  # chunked bodies declare no length
                return b"", PayloadTooLargeError(self._too_large(f"over {seen}"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return body, body_error(body)


async def _respond(error: APIError, scope, receive, send) -> None:
    response = JSONResponse(error.to_dict(), int(error.status_code), headers=error.headers)
    await response(scope, receive, send)


def _replay(body: bytes, receive):
    """A receive that hands the app the buffered body, then the connection's own messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
