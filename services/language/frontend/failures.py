"""Client-facing errors for failures of the engine and of the encode service."""

from __future__ import annotations

from services.language.encoder.rpc import ErrorKind
from services.language.engine.admission import AdmissionRefusedError
from services.language.engine.async_engine import EngineClosedError, EngineStepError
from services.language.engine.request import EngineDeadError, InvalidRequestError, QueueFullError
from services.language.errors import (
    APIError,
    BadRequestError,
    ImageInputError,
    InternalServerError,
    OverloadedError,
    ServiceUnavailableError,
)


def encode_failure(exc: Exception, retry_after_s: int) -> APIError:
    """The client-facing error for a failed encode: the image's fault (400) or ours (503)."""
    kind = getattr(exc, "kind", None)
    if kind is ErrorKind.INVALID:
        return ImageInputError(f"the image could not be encoded: {exc}")
    reason = kind.value if kind is not None else "no answer"
    return ServiceUnavailableError(
        f"the encode service could not encode the images ({reason}); retry shortly",
        retry_after_s=retry_after_s,
        code="encode_unavailable",
    )


def engine_failure(exc: BaseException, retry_after_s: int) -> BaseException:
    """The client-facing error for an engine exception."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineStepError):
        return InternalServerError(str(exc), code="engine_step_failed")
    if isinstance(exc, EngineClosedError):
        return ServiceUnavailableError(str(exc), retry_after_s=retry_after_s, code="shutting_down")
    if isinstance(exc, AdmissionRefusedError):
        return OverloadedError(str(exc), retry_after_s=exc.retry_after_s, code="queue_delay")
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(str(exc), retry_after_s=retry_after_s, code="engine_dead")
    if isinstance(exc, QueueFullError):
        return OverloadedError(
            f"the server is at capacity ({exc}); retry shortly", retry_after_s=retry_after_s
        )
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc))
    return exc
