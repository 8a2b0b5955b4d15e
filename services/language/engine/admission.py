"""Admission control: refuse a request at arrival when it could not get a first token in time.

Past saturation a queue only grows, and every request in it waits longer than the client will;
serving them all makes every time to first token bad and goodput collapse. So at arrival the
service estimates the wait a new request would see, the requests admitted ahead of it that have
no first token yet over the recent rate at which admitted requests get their first token, and
refuses it at once (429 with Retry-After) when that exceeds the bound.

The rate is measured on a clock that runs only while some admitted request is waiting for its
first token: under light load the wall clock would count idle time and report the arrival rate,
not what the service can do. A stall (no first tokens while requests wait) lowers the rate as
the busy clock advances, so a stuck engine sheds instead of queueing. Until a few first tokens
have been seen there is no rate yet, and a small number of requests is let in to measure it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from services.language.engine.request import QueueFullError

_WINDOW = 64  # first tokens the rate is measured over
_MIN_SAMPLES = 4  # first tokens needed before the rate is trusted
_MAX_RETRY_AFTER_S = 60
# The estimate is held to this share of the bound: the wait a request actually sees varies
# around the estimate (prefill bursts, slow encodes, the rate measured a moment ago), and the
# bound is on the tail, not the mean.
TARGET_SHARE = 0.4


class AdmissionRefusedError(QueueFullError):
    """The estimated wait for a first token exceeds the bound; retry after `retry_after_s`."""

    def __init__(self, message: str, estimate_s: float, retry_after_s: int) -> None:
        super().__init__(message)
        self.estimate_s = estimate_s
        self.retry_after_s = retry_after_s


class AdmissionTicket:
    """One admitted request until its first token (`started`) or its end (`close`)."""

    def __init__(self, control: AdmissionControl) -> None:
        self._control = control
        self._open = True

    def started(self) -> None:
        """The request produced its first token: it no longer waits, and counts for the rate."""
        if self._open:
            self._open = False
            self._control._leave(first_token=True)

    def close(self) -> None:
        """The request ended (or failed) before or after its first token."""
        if self._open:
            self._open = False
            self._control._leave(first_token=False)


class AdmissionControl:
    """Tracks requests waiting for a first token and the rate at which they get one.

    `max_delay_s` None admits everything (the estimate is still kept for metrics).
    Thread-safe: the HTTP and gRPC front ends share one instance on one loop, tests poke it
    from threads.
    """

    def __init__(
        self,
        max_delay_s: float | None,
        cold_start_pending: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_delay_s = max_delay_s
        self.cold_start_pending = cold_start_pending
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._busy = 0.0  # seconds with at least one request waiting for its first token
        self._since = clock()
        self._first_tokens: deque[float] = deque(maxlen=_WINDOW)  # busy clock at each
        self.num_refused = 0

    @property
    def num_pending(self) -> int:
        return self._pending

    def admit(self) -> AdmissionTicket:
        """A ticket for a new request, or AdmissionRefusedError when it would wait too long."""
        with self._lock:
            self._tick()
            if self.max_delay_s is not None:
                self._check_locked()
            self._pending += 1
        return AdmissionTicket(self)

    def estimate_s(self) -> float | None:
        """Estimated seconds until a request arriving now gets its first token (None: no rate
        measured yet)."""
        with self._lock:
            self._tick()
            rate = self._rate()
            return None if rate is None else (self._pending + 1) / rate

    def _check_locked(self) -> None:
        rate = self._rate()
        if rate is None:
            if self._pending < self.cold_start_pending:
                return
            # No rate yet and already a backlog: wait for the first answers to measure it
            estimate = math.inf
        else:
            estimate = (self._pending + 1) / rate
            if estimate <= self.max_delay_s * TARGET_SHARE:
                return
        self.num_refused += 1
        target = self.max_delay_s * TARGET_SHARE
        excess = estimate - target if math.isfinite(estimate) else self.max_delay_s
        retry_after = min(_MAX_RETRY_AFTER_S, max(1, math.ceil(excess)))
        shown = "unknown" if not math.isfinite(estimate) else f"{estimate:.2f} s"
        raise AdmissionRefusedError(
            f"{self._pending} requests are waiting for a first token; a new one would wait "
            f"about {shown}, over {TARGET_SHARE:.0%} of this server's bound of "
            f"{self.max_delay_s:g} s "
            "(--max-queue-delay); retry later or on another replica",
            estimate,
            retry_after,
        )

    def _rate(self) -> float | None:
        """First tokens per busy second over the window. The span runs to now, not to the last
        first token, so a stall (requests waiting, none answered) lowers the rate."""
        if len(self._first_tokens) < _MIN_SAMPLES:
            return None
        span = self._busy - self._first_tokens[0]
        if span <= 0:
            return None
        return (len(self._first_tokens) - 1) / span

    def _tick(self) -> None:
        now = self._clock()
        if self._pending > 0:
            self._busy += now - self._since
        self._since = now

    def _leave(self, first_token: bool) -> None:
        with self._lock:
            self._tick()
            self._pending -= 1
            if first_token:
                self._first_tokens.append(self._busy)
