"""Rendering errors over HTTP: the request gate middleware and FastAPI's exception handlers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.language.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
)

logger = logging.getLogger(__name__)


class RequestGate:
    """ASGI middleware: API key on /v1 routes and the request body size limit.

    It runs before FastAPI parses the body, so a wrong key gets 401 even when the body is not
    JSON, and an oversized body is refused without being buffered.
    """

    def __init__(self, app, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check(scope["path"], headers)
        if error is not None:
            response = JSONResponse(error.to_dict(), error.status_code, headers=error.headers)
            return await response(scope, receive, send)
        return await self.app(scope, self._limited(receive), send)

    def _check(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.api_key is not None and path.startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return AuthenticationError(
                    "invalid or missing API key; send 'Authorization: Bearer <key>'"
                )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return PayloadTooLargeError(self._too_large(declared))
        return None

    def _too_large(self, size: str) -> str:
        return f"request body is {size} bytes, above the limit of {self.max_request_bytes}"

    def _limited(self, receive):
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_request_bytes:  # chunked bodies declare no length
                raise PayloadTooLargeError(self._too_large(f"over {seen}"))
            return message

        return limited_receive


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
