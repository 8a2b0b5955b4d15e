"""Async client of the encode replicas: balancing, retries, fail-over and the handshake.

Each image of a request becomes its own Encode call, so a request's images are encoded in
parallel across replicas. An image goes to the replica its content hashes to (`placement`: every
language replica picks the same one, so repeats hit its cache) unless that one is over its share
of the calls in flight, then to the one with the fewest; a replica
that is unavailable (down, draining, overloaded), too slow, or whose link broke is skipped and the
image retried on another one, within the request's deadline. Embeddings arrive inline
(`encode_inline`) or over a torch.distributed link per replica (`encode_link`). With an expected
`EncoderContract`, every replica's GetInfo is checked before it is used, and again after it
was unreachable: a replica that comes back serving another model is never used.

Fail-over: every attempt has its own deadline (`attempt_timeout_s`, never past the request's),
so a replica that stalls costs one attempt, not the request. A replica that answered UNAVAILABLE
or let an attempt's deadline pass, or whose channel cannot connect, is taken out of rotation for
`cooldown_s`; then a grpc.health.v1 probe every `probe_interval_s` puts it back once it is
SERVING (a successful call does too). Only when every replica is out are they tried anyway.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from services.language.encoder import placement
from services.language.encoder.config import _FRAME_OVERHEAD, EncodeClientConfig
from services.language.encoder.inline import receive_inline
from services.language.encoder.link import LinkReceiver
from services.language.encoder.probe import ReplicaProbe
from services.language.encoder.replicas import Replica, ReplicaStats
from services.language.encoder.rpc import EncodeStub, ErrorKind, RemoteError
from services.language.encoder.shm import ShmReceiver
from shared.wire.errors import IncompatibleEncoderError, LinkError, SecurityConfigError
from shared.wire.images import EncodedImage, ImageRef
from shared.wire.info import (
    EncoderInfo,
    check_compatible,
    check_link_placement,
    device_uuid,
)
from shared.wire.shm import sweep_stale

log = logging.getLogger(__name__)

_RETRYABLE = frozenset(
    {ErrorKind.UNAVAILABLE, ErrorKind.OVERLOADED, ErrorKind.LINK_BROKEN, ErrorKind.DEADLINE}
)
# Failures that say the replica itself is gone or stuck, not just this call.
_COOL_DOWN = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE})


class EncodeError(RuntimeError):
    """An image could not be encoded; `kind` is the last failure's (None: no replica answered)."""

    def __init__(self, message: str, kind: ErrorKind | None = None, endpoint: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.endpoint = endpoint


class EncodeClient:
    """Encodes images on a pool of encode replicas; create and use it inside one event loop."""

    def __init__(self, config: EncodeClientConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.transport = config.transport
        if self.transport == "auto":  # shared memory hands a CPU tensor over without a copy
            self.transport = "ipc" if self.device.type == "cpu" else "grpc"
        sweep_stale()  # pools of processes killed while setting one up
        self._device_uuid = device_uuid(config.device)  # "" on a CPU
        self._pool = ThreadPoolExecutor(
            max(2, 2 * len(config.endpoints)), thread_name_prefix="encode-link"
        )
        self._replicas = []
        for address in config.endpoints:
            stub = EncodeStub(address, config.max_message_bytes, config.internal_token, config.tls)
            link = shm = None
            if config.transport == "nccl":
                link = LinkReceiver(stub, self.device, self._pool)
            if self.transport == "ipc":
                shm = ShmReceiver(stub, config.ipc_pool_bytes, config.inline_chunk_bytes)
            self._replicas.append(Replica(stub, link, shm))
        self._readiness = ReplicaProbe(
            config.endpoints, config.max_message_bytes, config.internal_token, config.tls
        )
        self._picks = itertools.count(1)
        self.retries = 0  # attempts made after a failed one
        self.link_fallbacks = 0  # images retried inline after their link transfer failed

    def outstanding(self, endpoint: str) -> int:
        """Calls in flight to one endpoint."""
        return self._by_address(endpoint).outstanding

    def replica_stats(self) -> dict[str, ReplicaStats]:
        """Per endpoint: in rotation or not, load, attempts and failures so far."""
        return {r.stub.address: r.stats() for r in self._replicas}

    def link_id(self, endpoint: str) -> str | None:
        """The id of the link to one endpoint, if one is up (for logs and diagnostics)."""
        link = self._by_address(endpoint).link
        return None if link is None else link.link_id

    async def info(self, endpoint: str | None = None) -> EncoderInfo:
        """GetInfo of one replica (the first by default)."""
        replica = self._replicas[0] if endpoint is None else self._by_address(endpoint)
        return await replica.stub.info(self.config.timeout_s)

    async def check_replicas(self, timeout_s: float) -> dict[str, EncoderInfo]:
        """The start-up handshake: GetInfo of every replica, checked against the expected
        contract. Raises IncompatibleEncoderError naming the first mismatch, and
        SecurityConfigError when a replica refuses this client's token; replicas that do not
        answer are checked later, before their first use."""
        infos = {}
        for replica in self._replicas:
            address = replica.stub.address
            try:
                if self.config.expected is None:
                    infos[address] = await replica.stub.info(timeout_s)
                else:
                    infos[address] = await self._verify(replica, timeout_s)
            except RemoteError as exc:
                if exc.kind is ErrorKind.UNAUTHENTICATED:
                    raise SecurityConfigError(
                        f"encode replica {address} refused this service's internal token "
                        f"({exc.detail}); give the language service the encode service's "
                        "--internal-token or --internal-token-file"
                    ) from None
                log.warning("encode replica %s not checked yet: %s", address, exc)
        return infos

    async def encode(
        self, images: Sequence[ImageRef], timeout_s: float | None = None
    ) -> list[EncodedImage]:
        """Encode a request's images in parallel; results in input order. Raises EncodeError."""
        deadline = time.monotonic() + (timeout_s or self.config.timeout_s)
        request_id = uuid.uuid4().hex[:12]
        tasks = [
            asyncio.ensure_future(self._encode_image(ref, deadline, f"{request_id}/{i}"))
            for i, ref in enumerate(images)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def encode_each(
        self, images: Sequence[ImageRef], timeout_s: float | None = None
    ) -> AsyncIterator[tuple[int, EncodedImage]]:
        """(index, image) as each image is encoded, in the order they finish; the first failure
        raises EncodeError and cancels the rest."""
        deadline = time.monotonic() + (timeout_s or self.config.timeout_s)
        request_id = uuid.uuid4().hex[:12]

        async def one(index: int, ref: ImageRef) -> tuple[int, EncodedImage]:
            return index, await self._encode_image(ref, deadline, f"{request_id}/{index}")

        tasks = [asyncio.ensure_future(one(i, ref)) for i, ref in enumerate(images)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    async def ready(self) -> bool:
        """Whether at least one replica answers SERVING (probed on channels of its own, cached
        for a second)."""
        return await self._readiness.any_serving()

    async def close(self) -> None:
        """Close links (telling the replicas) and channels."""
        for replica in self._replicas:
            if replica.probe is not None:
                replica.probe.cancel()
        for replica in self._replicas:
            if replica.link is not None:
                await replica.link.close()
            if replica.shm is not None:
                replica.shm.close()
            await replica.stub.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _by_address(self, address: str) -> Replica:
        for replica in self._replicas:
            if replica.stub.address == address:
                return replica
        raise KeyError(f"unknown endpoint {address}")

    def _pick(self, tried: set[str], key: bytes | None) -> Replica:
        now = time.monotonic()
        usable = [r for r in self._replicas if r.incompatible is None] or self._replicas
        for replica in usable:
            if replica.admitted and not replica.stub.reachable():
                self._cool_down(replica, "its channel cannot connect")
            if not replica.admitted and replica.probe is None and replica.down_until <= now:
                replica.probe = asyncio.ensure_future(self._probe(replica))
        # When every replica is out of rotation they are tried anyway: a down one fails fast.
        candidates = [r for r in usable if r.admitted] or usable
        fresh = [r for r in candidates if r.stub.address not in tried] or candidates
        replica = placement.choose(key if self.config.affinity else None, fresh)
        replica.last_pick = next(self._picks)
        return replica

    def _cool_down(self, replica: Replica, reason: object) -> None:
        if replica.admitted:
            log.warning(
                "encode replica %s out of rotation for %.1f s: %s",
                replica.stub.address,
                self.config.cooldown_s,
                reason,
            )
        replica.admitted = False
        replica.down_until = time.monotonic() + self.config.cooldown_s

    async def _probe(self, replica: Replica) -> None:
        """One health probe of a replica out of rotation: back in when SERVING."""
        try:
            serving = await replica.stub.serving(self.config.probe_timeout_s)
        finally:
            replica.probe = None
        if serving and not replica.admitted:
            replica.admitted = True
            log.info("encode replica %s is SERVING again; back in rotation", replica.stub.address)
        elif not serving:
            replica.down_until = time.monotonic() + self.config.probe_interval_s

    async def _verify(self, replica: Replica, timeout: float) -> EncoderInfo | None:
        """GetInfo and the contract check, unless already done since the replica was last
        unreachable; an incompatible replica is marked and IncompatibleEncoderError raised."""
        if self.config.expected is None or replica.verified:
            return None
        info = await replica.stub.info(timeout)
        try:
            check_compatible(self.config.expected, info, replica.stub.address)
            if replica.link is not None:
                check_link_placement(self._device_uuid, info, replica.stub.address)
        except IncompatibleEncoderError as exc:
            replica.incompatible = str(exc)
            log.error("%s; it will not be used", exc)
            raise
        replica.verified, replica.incompatible = True, None
        return info

    async def _encode_image(self, ref: ImageRef, deadline: float, request_id: str) -> EncodedImage:
        tried: set[str] = set()
        last: Exception | None = None
        inline = False  # after a link failure the image is retried inline, over gRPC
        key = await _affinity_key(ref)
        for attempt in range(self.config.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt:
                self.retries += 1
                log.info("retrying %s after: %s", request_id, last)
            replica = self._pick(tried, key)
            tried.add(replica.stub.address)
            budget = min(self.config.attempt_timeout_s, remaining)
            replica.outstanding += 1
            replica.attempts += 1
            try:
                image = await self._bounded_attempt(replica, ref, request_id, budget, inline)
                replica.admitted = True  # a call that works puts a replica back at once
                return image
            except RemoteError as exc:
                replica.failures += 1
                if exc.kind not in _RETRYABLE:
                    raise EncodeError(str(exc), exc.kind, exc.endpoint) from exc
                if exc.kind in _COOL_DOWN:
                    self._cool_down(replica, exc)
                if exc.kind is ErrorKind.UNAVAILABLE:
                    replica.verified = False  # it may come back as another process
                inline = inline or self._link_failed(replica, exc)
                last = exc
            except IncompatibleEncoderError as exc:
                replica.failures += 1
                replica.verified = False  # GetInfo decides at its next pick
                last = exc
            except LinkError as exc:
                replica.failures += 1
                inline = inline or self._link_failed(replica, exc)
                last = exc
            finally:
                replica.outstanding -= 1
        kind = last.kind if isinstance(last, RemoteError) else None
        raise EncodeError(
            f"image not encoded: attempts on {len(tried)} replica(s) failed or ran out of time; "
            f"last error: {last or 'deadline reached'}",
            kind if last is not None else ErrorKind.DEADLINE,
        )

    def _link_failed(self, replica: Replica, exc: Exception) -> bool:
        """Whether `exc` broke a link transfer (the image's next attempt then goes inline: the
        link's own peer or transport may be what failed; later requests set up a new link)."""
        failed = replica.link is not None and (
            isinstance(exc, LinkError) or exc.kind is ErrorKind.LINK_BROKEN
        )
        if failed:
            self.link_fallbacks += 1
            log.warning(
                "link to %s failed (%s); retrying the image inline", replica.stub.address, exc
            )
        return failed

    async def _bounded_attempt(
        self, replica: Replica, ref: ImageRef, request_id: str, budget: float, inline: bool
    ) -> EncodedImage:
        """Handshake (if due) and one attempt, together within `budget` seconds: the gRPC
        deadlines inside stop the replica's work, this bound stops everything else (link set-up
        threads, waits for the link's turn)."""
        deadline = time.monotonic() + budget
        try:
            async with asyncio.timeout(budget):
                await self._verify(replica, budget)
                left = max(deadline - time.monotonic(), 0.001)
                return await self._attempt(replica, ref, request_id, left, inline)
        except TimeoutError:
            raise RemoteError(
                ErrorKind.DEADLINE,
                f"no answer within the attempt's {budget:.1f} s",
                replica.stub.address,
            ) from None

    async def _attempt(
        self, replica: Replica, ref: ImageRef, request_id: str, timeout: float, inline: bool
    ) -> EncodedImage:
        expected = self.config.expected
        checkpoint = expected.checkpoint_id if expected is not None else None
        if replica.link is not None and not inline:
            return await replica.link.receive(ref, request_id, timeout, checkpoint)
        if replica.shm is not None:
            return await replica.shm.receive(ref, request_id, timeout, checkpoint)
        chunk = self.config.inline_chunk_bytes or self.config.max_message_bytes - _FRAME_OVERHEAD
        pin = self.device.type == "cuda"
        return await receive_inline(replica.stub, ref, request_id, chunk, timeout, pin, checkpoint)


_KEY_OFF_LOOP_BYTES = 1 << 20  # hashing a larger image takes milliseconds: off the event loop


async def _affinity_key(ref: ImageRef) -> bytes:
    if ref.data is not None and len(ref.data) > _KEY_OFF_LOOP_BYTES:
        return await asyncio.to_thread(placement.affinity_key, ref)
    return placement.affinity_key(ref)
