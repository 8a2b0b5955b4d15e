"""Rendering errors over HTTP: FastAPI's exception handlers turn every failure into OpenAI error
JSON (the request gate in `gate` refuses what must not reach a route at all)."""

from __future__ import annotations

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
    BadRequestError,
    InternalServerError,
    NotFoundError,
)

logger = logging.getLogger(__name__)


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
        # Starlette re-raises after this handler: the request gate (inside it) catches first,
        # so this is reached only by failures outside the app's routes
        logger.exception("unhandled error", exc_info=exc)
        return respond(InternalServerError("internal server error"))
