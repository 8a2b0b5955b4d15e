"""Receiving an image's packed embeddings through shared memory from a replica on this host.

The language service owns one pool per replica (`shared.wire.shm`): set up on first use with
OpenShm, a stream kept open for the pool's life (the replica unmaps it when the stream ends,
whichever side ended it). Per image: Encode is sent with a region of the pool sized like the
last image, and the replica writes the tensor there when it fits (one call); otherwise it holds
the tensor under a ticket, and CopyToShm writes it into a region of the size its header gives.
The embeddings handed to the engine are a view of the pool, copied by nobody on this side; the
region returns to the pool when the engine drops its last view.

A replica that cannot map the pool (another host, another /dev/shm namespace, a full pool
table) is served inline over gRPC from then on; so is one image when the pool is full.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.language.encoder.inline import receive_inline
from services.language.encoder.rpc import EncodeStub, ErrorKind, RemoteError, check_checkpoint
from shared.wire.codec import wire_dtype
from shared.wire.errors import WireFormatError
from shared.wire.images import EncodedImage, ImageRef
from shared.wire.shm import RegionPool, ShmError, map_file, new_pool_path

log = logging.getLogger(__name__)

_MIN_GUESS = 1 << 20


class ShmReceiver:
    """The pool shared with one replica, and the images received through it."""

    def __init__(self, stub: EncodeStub, pool_bytes: int, inline_chunk_bytes: int) -> None:
        self.stub = stub
        self.pool_bytes = pool_bytes
        self.inline_chunk_bytes = inline_chunk_bytes
        self.pool: RegionPool | None = None
        self.pool_id: str | None = None
        self.unusable: str | None = None  # why this replica is served inline
        self._lease = None
        self._setup = asyncio.Lock()
        self.inline_fallbacks = 0
        self._last_bytes = 0  # the last image's size, the next region's guess

    async def receive(
        self, ref: ImageRef, request_id: str, timeout: float, checkpoint_id: str | None = None
    ) -> EncodedImage:
        deadline = time.monotonic() + timeout
        if self.unusable is None:
            await self._ensure_pool(deadline)
        pool = self.pool
        if pool is None:
            return await self._inline(ref, request_id, deadline, checkpoint_id)
        # A region sized like the last image: the replica writes straight into it when the
        # tensor fits (one call), else it holds a ticket for CopyToShm into one of the right size
        guess = min(max(self._last_bytes, _MIN_GUESS), self.pool_bytes // 4)
        offset = pool.allocate(guess)
        region = None if offset is None else (self.pool_id, offset, guess)
        try:
            headers = await self.stub.encode_for_link(
                ref, request_id, None, _left(deadline), region
            )
        except BaseException as exc:
            if offset is not None:
                pool.release(offset, guess)
            if isinstance(exc, RemoteError) and exc.kind is ErrorKind.UNKNOWN_LINK:
                self._forget_pool(exc)  # the replica restarted: a new pool next time
                return await self._inline(ref, request_id, deadline, checkpoint_id)
            raise
        if len(headers) != 1:
            raise WireFormatError(f"{self.stub.address} returned {len(headers)} headers, not 1")
        header = headers[0]
        check_checkpoint(header, checkpoint_id, self.stub.address)
        self._last_bytes = header.num_bytes
        if header.ticket == 0 and offset is not None:  # written into the region
            pool.shrink(offset, guess, header.num_bytes)
        else:
            if offset is not None:
                pool.release(offset, guess)
            offset = await self._copy(pool, header, deadline)
            if offset is None:  # every region is in use: this image goes inline
                self.inline_fallbacks += 1
                return await self._inline(ref, request_id, deadline, checkpoint_id)
        dtype = wire_dtype(header.dtype)
        return EncodedImage(
            pool.view(offset, header.num_bytes, dtype, header.shape),
            header.grid_thw,
            header.content_hash,
            header.cache_hit,
            self.stub.address,
            timestamps=header.timestamps,
        )

    async def _copy(self, pool: RegionPool, header, deadline: float) -> int | None:
        """CopyToShm of a ticket into a region of its size; its offset (None: no room)."""
        offset = pool.allocate(header.num_bytes)
        if offset is None:
            return None
        try:
            await self.stub.copy_to_shm(
                self.pool_id, header.ticket, offset, header.num_bytes, _left(deadline)
            )
        except BaseException:
            pool.release(offset, header.num_bytes)
            raise
        return offset

    def _forget_pool(self, reason: object) -> None:
        log.warning(
            "%s forgot its shared-memory pool (%s); setting up a new one", self.stub.address, reason
        )
        self.close()
        self.pool = None
        self.pool_id = None

    async def _inline(self, ref, request_id, deadline, checkpoint_id) -> EncodedImage:
        chunk = self.inline_chunk_bytes
        return await receive_inline(
            self.stub, ref, request_id, chunk, _left(deadline), False, checkpoint_id
        )

    async def _ensure_pool(self, deadline: float) -> None:
        async with self._setup:
            if self.pool is not None or self.unusable is not None:
                return
            path = new_pool_path()
            try:
                mapping = map_file(path, self.pool_bytes, create=True)
            except ShmError as exc:
                self._give_up(f"no shared memory here: {exc}")
                return
            call = self.stub.open_shm(str(path), self.pool_bytes)
            try:
                self.pool_id = await self.stub.first_pool_id(call, _left(deadline))
            except (RemoteError, TimeoutError) as exc:
                call.cancel()
                mapping.close()
                self._give_up(f"the replica cannot map the pool ({exc})")
                return
            finally:
                path.unlink(missing_ok=True)  # mapped on both sides (or given up): no name
            self._lease = call
            self.pool = RegionPool(mapping, self.pool_bytes)
            log.info(
                "shared-memory pool of %d MiB with %s", self.pool_bytes >> 20, self.stub.address
            )

    def _give_up(self, reason: str) -> None:
        self.unusable = reason
        log.warning("%s: images go inline over gRPC: %s", self.stub.address, reason)

    def close(self) -> None:
        """End the lease (the replica unmaps the pool); views handed out stay valid."""
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
