"""The API key check of the language service's HTTP and gRPC front ends."""

from __future__ import annotations

from shared.wire.security import secrets_match


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization` value is 'Bearer <api_key>' (the key compared in constant
    time)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets_match(token.strip(), api_key)
