"""Async client of the encode service, used by the language service.

Each image of a request becomes its own Encode call, so a request's images are encoded in parallel
across replicas. Calls go to the replica with the fewest outstanding calls; a replica that is
unavailable (down, draining, overloaded) or whose link broke is skipped and the image retried on
another one, within the request's deadline. Embeddings arrive inline over gRPC or, with transport
"nccl", over a torch.distributed link per replica (NCCL on CUDA devices, gloo on CPU).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from services.encode.transport import (
    ChunkView,
    LinkError,
    P2PLink,
    TensorAssembler,
    WireFormatError,
    join_link,
    link_backend,
    parse_chunk_frame,
    transfer_tag,
    wire_dtype,
)

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["EncodeService"].full_name
# Worth another replica: it is down, draining, overloaded, or the link to it broke.
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
TRANSPORTS = ("grpc", "nccl")
_FRAME_OVERHEAD = 1024  # a chunk message's bytes besides its data, with room to spare


class EncodeError(RuntimeError):
    """An image could not be encoded; `code` is the last gRPC status (None for local failures)."""

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, endpoint: str | None = None
    ):
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint


@dataclass(frozen=True)
class EncodeClientConfig:
    """Endpoints (host:port) and behaviour of an EncodeClient."""

    endpoints: tuple[str, ...]
    transport: str = "grpc"  # "grpc" (inline bytes) or "nccl" (a link; gloo on CPU devices)
    device: str = "cpu"  # where received tensors live
    timeout_s: float = 60.0  # per request, all attempts included
    max_attempts: int = 3  # per image
    cooldown_s: float = 2.0  # a replica that was unavailable is avoided this long
    max_message_bytes: int = 256 * 1024 * 1024  # gRPC receive limit
    # Inline tensors arrive in chunks of this size, reassembled as they come (bench/transfer.py:
    # the pipelining beats the copy it costs). 0 asks for each tensor in one message (up to
    # max_message_bytes), then used in place without any copy of the client's own.
    inline_chunk_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("EncodeClientConfig needs at least one endpoint")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError("max_message_bytes must be at least gRPC's default 4 MiB")
        if not 0 <= self.inline_chunk_bytes <= self.max_message_bytes - _FRAME_OVERHEAD:
            raise ValueError("inline_chunk_bytes must be 0 or fit in max_message_bytes")
        if self.max_attempts < 1 or self.timeout_s <= 0:
            raise ValueError("max_attempts must be >= 1 and timeout_s > 0")


@dataclass(frozen=True)
class ImageInput:
    """One image to encode: its bytes, a URL, or only the content hash of an image sent before."""

    data: bytes | None = None
    url: str | None = None
    content_hash: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.data is not None and self.url is not None:
            raise ValueError("give an image's data or its url, not both")
        if self.data is None and self.url is None and not self.content_hash:
            raise ValueError("an image needs data, a url or a content_hash")

    def message(self) -> pb.ImageInput:
        msg = pb.ImageInput(
            content_hash=self.content_hash or "",
            min_pixels=self.min_pixels or 0,
            max_pixels=self.max_pixels or 0,
        )
        if self.data is not None:
            msg.data = self.data
        elif self.url is not None:
            msg.url = self.url
        return msg


@dataclass(frozen=True)
class EncodedImage:
    """One image's packed embeddings [num_tokens, (1+k)*H] on the client's device.

    With the grpc transport and a CPU device, a tensor that came in one message (it fit in a chunk)
    views that message in place: treat it as read-only (splicing into a prompt only reads it).
    """

    packed: torch.Tensor
    grid_thw: tuple[int, int, int]
    content_hash: str
    cache_hit: bool
    endpoint: str

    @classmethod
    def from_header(cls, header: pb.ImageHeader, packed: torch.Tensor, endpoint: str):
        return cls(packed, tuple(header.grid_thw), header.content_hash, header.cache_hit, endpoint)

    def split(self, num_deepstack: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [n, H], deepstack [n, k*H]) views of the packed tensor."""
        from shared.model.qwen3_vl_moe import separate_deepstack_embeds

        return separate_deepstack_embeds(self.packed, num_deepstack)


def _parse_encode_response(frame: bytes):
    # Tensor chunks are read straight from the frame; headers go through the generated class.
    return parse_chunk_frame(frame) or pb.EncodeResponse.FromString(frame)


class _Endpoint:
    """One replica: channel, outstanding calls, cool-down and (nccl transport) its link."""

    def __init__(self, address: str, options: list[tuple[str, int]]):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.EncodeServiceStub(self.channel)
        self.encode = self.channel.unary_stream(
            f"/{_SERVICE}/Encode",
            request_serializer=pb.EncodeRequest.SerializeToString,
            response_deserializer=_parse_encode_response,
        )
        self.outstanding = 0
        self.last_pick = 0
        self.down_until = 0.0
        self.link: P2PLink | None = None
        self.link_setup = asyncio.Lock()
        self.transfer_lock = asyncio.Lock()  # one transfer at a time per link: never interleaved


class EncodeClient:
    """Encodes images on a pool of encode replicas; create and use it inside one event loop."""

    def __init__(self, config: EncodeClientConfig):
        self.config = config
        self.device = torch.device(config.device)
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
        self._endpoints = [_Endpoint(a, options) for a in config.endpoints]
        self._picks = itertools.count(1)
        self._link_pool = ThreadPoolExecutor(
            max(2, 2 * len(self._endpoints)), thread_name_prefix="encode-link"
        )
        self.retries = 0  # attempts made after a failed one

    def outstanding(self, endpoint: str) -> int:
        """Calls in flight to one endpoint."""
        return self._by_address(endpoint).outstanding

    def link_id(self, endpoint: str) -> str | None:
        """The id of the link to one endpoint, if one is up (for logs and diagnostics)."""
        link = self._by_address(endpoint).link
        return None if link is None or link.broken else link.link_id

    async def encode(
        self, images: Sequence[ImageInput], timeout_s: float | None = None
    ) -> list[EncodedImage]:
        """Encode a request's images in parallel; results in input order. Raises EncodeError."""
        deadline = time.monotonic() + (timeout_s or self.config.timeout_s)
        request_id = uuid.uuid4().hex[:12]
        tasks = [
            asyncio.ensure_future(self._encode_image(img, deadline, f"{request_id}/{i}"))
            for i, img in enumerate(images)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def info(self, endpoint: str | None = None) -> pb.GetInfoResponse:
        """GetInfo of one replica (the first by default)."""
        ep = self._endpoints[0] if endpoint is None else self._by_address(endpoint)
        return await ep.stub.GetInfo(pb.GetInfoRequest(), timeout=self.config.timeout_s)

    async def close(self) -> None:
        """Close links (telling the replicas) and channels."""
        for ep in self._endpoints:
            link, ep.link = ep.link, None
            if link is not None:
                try:
                    await ep.stub.CloseLink(pb.CloseLinkRequest(link_id=link.link_id), timeout=2)
                except grpc.aio.AioRpcError:
                    pass  # the replica may be gone; its side of the link dies with it
                link.close("client closed")
            await ep.channel.close()
        self._link_pool.shutdown(wait=False, cancel_futures=True)

    def _by_address(self, address: str) -> _Endpoint:
        for ep in self._endpoints:
            if ep.address == address:
                return ep
        raise KeyError(f"unknown endpoint {address}")

    def _pick(self, tried: set[str]) -> _Endpoint:
        now = time.monotonic()
        fresh = [e for e in self._endpoints if e.address not in tried] or self._endpoints
        up = [e for e in fresh if e.down_until <= now] or fresh
        ep = min(up, key=lambda e: (e.outstanding, e.last_pick))
        ep.last_pick = next(self._picks)
        return ep

    async def _encode_image(
        self, image: ImageInput, deadline: float, request_id: str
    ) -> EncodedImage:
        tried: set[str] = set()
        last: Exception | None = None
        for attempt in range(self.config.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt:
                self.retries += 1
                log.info("retrying %s after: %s", request_id, _describe(last))
            ep = self._pick(tried)
            tried.add(ep.address)
            ep.outstanding += 1
            try:
                if self.config.transport == "grpc":
                    return await self._inline(ep, image, remaining, request_id)
                return await self._via_link(ep, image, remaining, request_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise EncodeError(
                        f"{ep.address}: {exc.code().name}: {exc.details()}", exc.code(), ep.address
                    ) from exc
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    ep.down_until = time.monotonic() + self.config.cooldown_s
                last = exc
            except LinkError as exc:
                last = exc
            finally:
                ep.outstanding -= 1
        code = last.code() if isinstance(last, grpc.aio.AioRpcError) else None
        if last is None:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        raise EncodeError(
            f"image not encoded: attempts on {len(tried)} replica(s) failed or ran out of time; "
            f"last error: {_describe(last)}",
            code,
        )

    async def _inline(
        self, ep: _Endpoint, image: ImageInput, timeout: float, request_id: str
    ) -> EncodedImage:
        request = pb.EncodeRequest(
            request_id=request_id,
            images=[image.message()],
            transport=pb.TRANSPORT_INLINE,
            max_chunk_bytes=self.config.inline_chunk_bytes
            or self.config.max_message_bytes - _FRAME_OVERHEAD,
        )
        header, assembler = None, None
        async for msg in ep.encode(request, timeout=timeout):
            if isinstance(msg, ChunkView):
                if assembler is None:
                    raise WireFormatError("tensor chunk before its header")
                assembler.write(msg.offset, msg.data)
            elif msg.WhichOneof("payload") == "header":
                header = msg.header
                assembler = TensorAssembler(
                    wire_dtype(header.dtype), header.shape, header.num_bytes
                )
        if header is None:
            raise WireFormatError(f"{ep.address} returned no image")
        packed = assembler.result()
        if self.device.type != "cpu":
            packed = packed.to(self.device, non_blocking=True)
        return EncodedImage.from_header(header, packed, ep.address)

    async def _via_link(
        self, ep: _Endpoint, image: ImageInput, timeout: float, request_id: str
    ) -> EncodedImage:
        link = await self._ensure_link(ep, timeout)
        request = pb.EncodeRequest(
            request_id=request_id,
            images=[image.message()],
            transport=pb.TRANSPORT_LINK,
            link_id=link.link_id,
        )
        try:
            headers = [m.header async for m in ep.encode(request, timeout=timeout)]
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the replica forgot the link
                self._drop_link(ep, link, exc.details() or "unknown to the replica")
                raise LinkError(f"{ep.address}: {exc.details()}") from exc
            raise
        if len(headers) != 1:
            raise WireFormatError(f"{ep.address} returned {len(headers)} headers for one image")
        header = headers[0]
        # Shielded: once the replica starts sending, the receive must complete or the link is lost.
        transfer = asyncio.ensure_future(self._transfer(ep, link, header, timeout))
        transfer.add_done_callback(_consume_exception)  # seen here even if the caller gave up
        packed = await asyncio.shield(transfer)
        return EncodedImage.from_header(header, packed, ep.address)

    async def _transfer(self, ep: _Endpoint, link: P2PLink, header, timeout: float):
        loop = asyncio.get_running_loop()
        async with ep.transfer_lock:
            if link.broken:
                raise LinkError(f"link {link.link_id} to {ep.address} broke before the transfer")
            call = ep.stub.Transfer(
                pb.TransferRequest(link_id=link.link_id, tickets=[header.ticket]), timeout=timeout
            )
            try:
                ready = await call.read()  # the tickets exist and the replica is sending
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._drop_link(ep, link, exc.details() or "unknown to the replica")
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    # Nothing was sent: encoding again (a cache hit) over a good link recovers.
                    raise LinkError(f"{ep.address}: transfer refused: {exc.details()}") from exc
                raise
            if ready is grpc.aio.EOF:
                raise LinkError(f"{ep.address} ended the transfer before it started")
            spec = (tuple(header.shape), wire_dtype(header.dtype))
            received = loop.run_in_executor(
                self._link_pool, link.recv, [spec], [transfer_tag(header.ticket)]
            )
            try:
                await call.read()  # done
            except grpc.aio.AioRpcError:
                self._drop_link(ep, link, "the replica's send failed")
                received.cancel()
                raise
            return (await received)[0]

    async def _ensure_link(self, ep: _Endpoint, timeout: float) -> P2PLink:
        async with ep.link_setup:
            if ep.link is not None and not ep.link.broken:
                return ep.link
            if ep.link is not None:
                self._drop_link(ep, ep.link, "broken")
            offer = await ep.stub.OpenLink(
                pb.OpenLinkRequest(device=str(self.device)), timeout=timeout
            )
            if offer.backend != link_backend(self.device):
                raise EncodeError(
                    f"{ep.address} links with {offer.backend} but this client's "
                    f"device {self.device} needs {link_backend(self.device)}",
                    endpoint=ep.address,
                )

            loop = asyncio.get_running_loop()
            where = (offer.link_id, offer.store_host, offer.store_port, offer.rank)
            joining = loop.run_in_executor(
                self._link_pool, join_link, *where, self.device, offer.timeout_s
            )
            ep.link = await asyncio.wait_for(joining, timeout)
            log.info("link %s to %s ready (%s)", offer.link_id, ep.address, offer.backend)
            return ep.link

    def _drop_link(self, ep: _Endpoint, link: P2PLink, reason: str) -> None:
        """Forget a link here and, best effort, on the replica."""
        if ep.link is link:
            ep.link = None
        link.close(reason)
        closing = ep.stub.CloseLink(pb.CloseLinkRequest(link_id=link.link_id), timeout=2)
        asyncio.ensure_future(closing).add_done_callback(_consume_exception)


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "deadline reached"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
