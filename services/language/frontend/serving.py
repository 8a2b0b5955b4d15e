"""The serving lifecycle of the front end: admission of API requests, in-flight accounting, the
drain on shutdown, and the encode replicas' readiness.

An API request takes a `RequestSlot` before any of its work (image loading and encoding
included), so the wait that admission control estimates covers the whole time to first token,
and the drain knows when the last response has been sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from services.language.engine.admission import AdmissionControl, AdmissionTicket
from services.language.errors import ServiceUnavailableError
from services.language.frontend.failures import engine_failure
from services.language.frontend.ports import EngineClient

logger = logging.getLogger(__name__)

_AFTER_FAIL_WAIT_S = 5.0  # streams ended by the drain timeout get this long to send their error


class RequestSlot:
    """An admitted API request: its admission ticket and its place among in-flight requests."""

    def __init__(self, ticket: AdmissionTicket, on_close) -> None:
        self._ticket = ticket
        self._on_close = on_close
        self._open = True

    def started(self) -> None:
        """The first output arrived."""
        self._ticket.started()

    def close(self) -> None:
        """The response is complete (or failed); idempotent."""
        if self._open:
            self._open = False
            self._ticket.close()
            self._on_close()


class ServingState:
    """Whether new requests are admitted, and how many are in flight."""

    def __init__(self, admission: AdmissionControl, retry_after_s: int = 1) -> None:
        self.admission = admission
        self.retry_after_s = retry_after_s
        self.draining = False
        self.num_open = 0
        self._listeners: list = []

    def open(self) -> RequestSlot:
        """A slot for a new request: 503 while draining, 429 when its estimated wait for a
        first token is above --max-queue-delay. Close it when the response is complete."""
        if self.draining:
            raise ServiceUnavailableError(
                "the server is shutting down and takes no new requests; send them to another "
                "replica",
                retry_after_s=self.retry_after_s,
                code="shutting_down",
            )
        try:
            ticket = self.admission.admit()
        except Exception as exc:
            raise engine_failure(exc, self.retry_after_s) from exc
        self.num_open += 1
        return RequestSlot(ticket, self._closed)

    def _closed(self) -> None:
        self.num_open -= 1

    def on_drain(self, listener) -> None:
        """`await listener()` when draining starts (the gRPC server turns NOT_SERVING)."""
        self._listeners.append(listener)

    async def drain(self, engine: EngineClient, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Stop admitting, let in-flight requests finish for up to `timeout_s`, then end the
        rest with an error. True when every request finished on its own."""
        self.draining = True
        for listener in self._listeners:
            try:
                await listener()
            except Exception:  # noqa: BLE001 - one listener's failure must not stop the drain
                logger.exception("drain listener failed")
        logger.info("draining: %d request(s) in flight, up to %g s", self.num_open, timeout_s)
        if await self._wait_closed(timeout_s, poll_s):
            logger.info("drained: every request finished")
            return True
        reason = (
            f"the server shut down before the request finished (drain timeout "
            f"{timeout_s:g} s); retry it on another replica"
        )
        logger.warning("drain timeout: ending %d request(s) with an error", self.num_open)
        engine.close(reason)
        with suppress(Exception):
            await engine.fail_all(reason)
        await self._wait_closed(_AFTER_FAIL_WAIT_S, poll_s)
        return False

    async def _wait_closed(self, timeout_s: float, poll_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.num_open > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True
