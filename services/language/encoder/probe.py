"""Readiness of the encode replicas: is at least one of them SERVING?"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from services.language.encoder.rpc import EncodeStub
from shared.wire.security import TLSFiles

_PROBE_CACHE_S = 1.0  # readiness probes of the encode replicas are reused this long
_PROBE_TIMEOUT_S = 1.0


class ReplicaProbe:
    """Whether at least one encode replica answers grpc.health.v1 SERVING, probed on channels
    of its own (the encode client's rotation state is not touched) and cached for a second,
    so a readiness probe every second costs one health call per replica at most."""

    def __init__(
        self,
        endpoints: tuple[str, ...],
        max_message_bytes: int,
        token: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._stub_args = (max_message_bytes, token, tls)
        self._checked_at = -float("inf")
        self._serving = False
        self._lock = asyncio.Lock()

    async def any_serving(self) -> bool:
        async with self._lock:
            if time.monotonic() - self._checked_at >= _PROBE_CACHE_S:
                self._serving = await self._probe()
                self._checked_at = time.monotonic()
            return self._serving

    async def _probe(self) -> bool:
        stubs = [EncodeStub(address, *self._stub_args) for address in self._endpoints]
        try:
            results = await asyncio.gather(
                *(stub.serving(_PROBE_TIMEOUT_S) for stub in stubs), return_exceptions=True
            )
        finally:
            for stub in stubs:
                with suppress(Exception):
                    await stub.close()
        return any(result is True for result in results)
