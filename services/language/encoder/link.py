"""Receiving an image's packed embeddings over a torch.distributed link to one replica.

Control stays on gRPC (Encode returns a ticket, Transfer redeems it); the bytes go by one
send/recv straight into a tensor allocated on the engine's device: NCCL between CUDA devices
(no host copy at all), gloo on CPU, one code path. One link per replica, set up on first use,
and one transfer at a time on it, so concurrent requests never interleave their bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from services.language.encoder.rpc import (
    EncodeStub,
    ErrorKind,
    ImageHeader,
    RemoteError,
    check_checkpoint,
)
from shared.wire.codec import wire_dtype
from shared.wire.errors import LinkError, WireFormatError
from shared.wire.images import EncodedImage, ImageRef
from shared.wire.link import P2PLink, join_link, link_backend, transfer_tag

log = logging.getLogger(__name__)


class LinkReceiver:
    """The link to one replica and the transfers over it; use within one event loop."""

    def __init__(self, stub: EncodeStub, device: torch.device, pool: ThreadPoolExecutor):
        self.stub = stub
        self.device = device
        self._pool = pool
        self.link: P2PLink | None = None
        self._setup = asyncio.Lock()
        self._transfer = asyncio.Lock()

    @property
    def link_id(self) -> str | None:
        return None if self.link is None or self.link.broken else self.link.link_id

    async def receive(
        self, ref: ImageRef, request_id: str, timeout: float, checkpoint_id: str | None = None
    ) -> EncodedImage:
        """Encode one image on the replica and receive its tensor over the link, all within
        `timeout` seconds (link set-up, Encode and Transfer together)."""
        deadline = time.monotonic() + timeout
        link = await self._ensure_link(deadline)
        try:
            headers = await self.stub.encode_for_link(
                ref, request_id, link.link_id, _left(deadline)
            )
        except RemoteError as exc:
            if exc.kind is ErrorKind.UNKNOWN_LINK:
                self.drop(link, exc.detail)
                raise LinkError(str(exc)) from exc
            raise
        if len(headers) != 1:
            raise WireFormatError(f"{self.stub.address} returned {len(headers)} headers, not 1")
        header = headers[0]
        check_checkpoint(header, checkpoint_id, self.stub.address)
        # Shielded: once the replica starts sending, the receive must complete or the link is
        # lost; a caller that gives up leaves it to finish (or time out) on its own.
        transfer = asyncio.ensure_future(self._receive(link, header, deadline))
        transfer.add_done_callback(_consume_exception)
        packed = await asyncio.shield(transfer)
        return EncodedImage(
            packed,
            header.grid_thw,
            header.content_hash,
            header.cache_hit,
            self.stub.address,
            timestamps=header.timestamps,
        )

    async def _receive(self, link: P2PLink, header: ImageHeader, deadline: float) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        async with self._transfer:
            if link.broken:
                raise LinkError(f"link {link.link_id} to {self.stub.address} broke before use")
            timeout = _left(deadline)
            call = self.stub.transfer(link.link_id, [header.ticket], timeout)
            try:
                await call.ready()
            except RemoteError as exc:
                if exc.kind is ErrorKind.UNKNOWN_LINK:
                    self.drop(link, exc.detail)
                if exc.kind in (ErrorKind.UNKNOWN_LINK, ErrorKind.NOT_FOUND):
                    # Nothing was sent: encoding again (a cache hit) over a good link recovers.
                    raise LinkError(f"{self.stub.address}: transfer refused: {exc.detail}") from exc
                if exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE):
                    # The replica died or stalled mid-call: the link to it is gone too.
                    self.drop(link, exc.detail)
                raise
            spec = (header.shape, wire_dtype(header.dtype))
            # The recv gives up with the attempt, so a stalled sender cannot hold the link (and
            # this pool's thread) for the link's whole timeout.
            received = loop.run_in_executor(
                self._pool, link.recv, [spec], [transfer_tag(header.ticket)], _left(deadline)
            )
            try:
                await call.done()
            except RemoteError:
                self.drop(link, "the replica's send failed")
                received.cancel()
                raise
            return (await received)[0]

    async def _ensure_link(self, deadline: float) -> P2PLink:
        async with self._setup:
            if self.link is not None and not self.link.broken:
                return self.link
            if self.link is not None:
                self.drop(self.link, "broken")
            offer = await self.stub.open_link(str(self.device), _left(deadline))
            if offer.backend != link_backend(self.device):
                raise RemoteError(
                    ErrorKind.INVALID,
                    f"the replica links with {offer.backend} but device {self.device} needs "
                    f"{link_backend(self.device)}",
                    self.stub.address,
                )
            loop = asyncio.get_running_loop()
            where = (offer.link_id, offer.store_host, offer.store_port, offer.rank)
            joining = loop.run_in_executor(
                self._pool,
                partial(join_link, *where, self.device, offer.timeout_s, secret=offer.secret),
            )
            try:
                done, _ = await asyncio.wait({joining}, timeout=_left(deadline))
            finally:
                if not joining.done():  # timed out or cancelled: the join goes on in its thread
                    joining.add_done_callback(partial(self._close_late, offer.link_id))
            if not done:
                raise RemoteError(
                    ErrorKind.DEADLINE,
                    f"link {offer.link_id} not joined in time",
                    self.stub.address,
                )
            self.link = joining.result()
            log.info("link %s to %s ready (%s)", offer.link_id, self.stub.address, offer.backend)
            return self.link

    def _close_late(self, link_id: str, joining: asyncio.Future) -> None:
        """A join that finished after its caller gave up leaves a link nobody holds."""
        if not joining.cancelled() and joining.exception() is None:
            self.drop(joining.result(), "set up after its caller gave up")
        else:
            closing = asyncio.ensure_future(self.stub.close_link(link_id))
            closing.add_done_callback(_consume_exception)

    def drop(self, link: P2PLink, reason: str) -> None:
        """Forget a link here and, best effort, on the replica."""
        if self.link is link:
            self.link = None
        link.close(reason)
        closing = asyncio.ensure_future(self.stub.close_link(link.link_id))
        closing.add_done_callback(_consume_exception)

    async def close(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            await self.stub.close_link(link.link_id)
            link.close("client closed")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
