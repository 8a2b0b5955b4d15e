"""Rendering errors over HTTP: the request gate middleware and FastAPI's exception handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.auth import bearer_matches
from services.language.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
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


class RequestGate:
    """ASGI middleware: API key on /v1 routes, the request body size limit, the JSON shape
    limits, and 503 for new work while the server drains.

    It runs before FastAPI parses the body, so a wrong key gets 401 even when the body is not
    JSON, and an oversized or too deeply nested body is refused without being parsed.
    """

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
            response = JSONResponse(error.to_dict(), error.status_code, headers=error.headers)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

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
        return body, json_shape_error(body)


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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return f"request body is not valid JSON: {detail}", None
    # A union (string or list of parts) reports one error per branch; the deepest is the
    # one that says what is actually wrong ("Input tag 'audio' ... does not match")
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(part) for part in error.get("loc", ()) if not _is_branch_label(part)]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return f"{where}{error.get('msg', 'invalid value')}", param


def _is_branch_label(part: Any) -> bool:
    # pydantic names union branches in `loc` ("str", "list[...]", "function-after[...]")
    return part == "body" or (isinstance(part, str) and (part in _TYPE_LABELS or "[" in part))


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None]) -> None:
    """Render every failure as OpenAI error JSON; `on_error` sees each error (for metrics)."""

    def respond(error: APIError) -> JSONResponse:
        on_error(error)
        return JSONResponse(error.to_dict(), int(error.status_code), headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return respond(BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, APIError):  # raised while FastAPI read the body
            return respond(exc.__cause__)
        if exc.status_code == HTTPStatus.NOT_FOUND:
            return respond(NotFoundError(f"no route {request.method} {request.url.path}"))
        error = BadRequestError(str(exc.detail))
        error.status_code = exc.status_code
        return respond(error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log only; clients get a generic message
        logger.exception("unhandled error", exc_info=exc)
        return respond(InternalServerError("internal server error"))
