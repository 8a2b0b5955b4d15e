"""Receiving an image's packed embeddings through shared memory from a replica on this host.

The language service owns one pool per replica (`shared.wire.shm`): set up on first use with
OpenShm, a stream kept open for the pool's life (the replica unmaps it when the stream ends,
whichever side ended it). Per image: Encode leaves the tensor under a ticket, the header gives
its size, a region of the pool is allocated and CopyToShm has the replica write the tensor
there: the embeddings handed to the engine are a view of the pool, copied by nobody on this
side. The region returns to the pool when the engine drops its last view.

A replica that cannot map the pool (another host, another /dev/shm namespace, a full pool
table) is served inline over gRPC from then on; so is one image when the pool is full.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.language.encoder.inline import receive_inline
from services.language.encoder.rpc import EncodeStub, RemoteError, check_checkpoint
from shared.wire.codec import wire_dtype
from shared.wire.errors import WireFormatError
from shared.wire.images import EncodedImage, ImageRef
from shared.wire.shm import RegionPool, ShmError, map_file, new_pool_path

log = logging.getLogger(__name__)


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

    async def receive(
        self, ref: ImageRef, request_id: str, timeout: float, checkpoint_id: str | None = None
    ) -> EncodedImage:
        deadline = time.monotonic() + timeout
        if self.unusable is None:
            await self._ensure_pool(deadline)
        if self.pool is None:
            return await self._inline(ref, request_id, deadline, checkpoint_id)
        headers = await self.stub.encode_for_link(ref, request_id, None, _left(deadline))
        if len(headers) != 1:
            raise WireFormatError(f"{self.stub.address} returned {len(headers)} headers, not 1")
        header = headers[0]
        check_checkpoint(header, checkpoint_id, self.stub.address)
        offset = self.pool.allocate(header.num_bytes)
        if offset is None:  # every region is in use: this image goes inline
            self.inline_fallbacks += 1
            return await self._inline(ref, request_id, deadline, checkpoint_id)
        try:
            await self.stub.copy_to_shm(
                self.pool_id, header.ticket, offset, header.num_bytes, _left(deadline)
            )
            packed = self.pool.view(
                offset, header.num_bytes, wire_dtype(header.dtype), header.shape
            )
        except BaseException:
            self.pool.release(offset, header.num_bytes)
            raise
        return EncodedImage(
            packed,
            header.grid_thw,
            header.content_hash,
            header.cache_hit,
            self.stub.address,
            timestamps=header.timestamps,
        )

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
