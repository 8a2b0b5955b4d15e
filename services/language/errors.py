"""Errors the language service's front end reports to clients.

Each error carries its HTTP status and OpenAI error fields, so the HTTP layer renders every
failure as `{"error": {"message", "type", "param", "code"}}`; the gRPC layer maps each error
class to its own status code. Nothing here depends on a web framework or on the rest of the
service: every package of the front end may raise these.
Messages are written for the caller: they say what was wrong and what to change.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class APIError(Exception):
    """A failure that a client caused or must react to, with its HTTP status and OpenAI fields."""

    status_code: int = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "internal_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequestError(APIError):
    """The request is malformed or asks for something the server cannot do (HTTP 400)."""

    status_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = HTTPStatus.UNAUTHORIZED
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    """Unknown model or route (HTTP 404)."""

    status_code = HTTPStatus.NOT_FOUND
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    """An image or body above the configured size limit (HTTP 413)."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class OverloadedError(APIError):
    """The waiting queue is full; the client should retry after `Retry-After` seconds (HTTP 429)."""

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailableError(APIError):
    """A dependency (the encode service) is down or the server is shutting down (HTTP 503)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "service_unavailable_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class InternalServerError(APIError):
    """An unexpected failure; the message never carries internals such as stack traces."""

    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "internal_error"


class ImageInputError(BadRequestError):
    """An image part that cannot be used: bad URL, bad base64, not an image, blocked address."""


class ImageTooLargeError(PayloadTooLargeError):
    """An image whose bytes or pixel count exceed the configured limits."""
