"""The language service's adapter to the encode service's gRPC API.

The only language-side module that imports the generated `encode_pb2` code: it turns domain
requests (`ImageRef`) into messages and responses into domain types (`ImageHeader`,
`LinkOffer`, `EncoderInfo`), and every gRPC failure into a `RemoteError` with a transport-free
`ErrorKind`, so balancing and retry logic never sees a status code.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.splitvl.encode.v1 import encode_pb2 as pb
from proto.splitvl.encode.v1 import encode_pb2_grpc as pb_grpc
from shared.wire.codec import ChunkView, parse_chunk_frame
from shared.wire.errors import IncompatibleEncoderError
from shared.wire.images import ImageRef
from shared.wire.info import EncoderInfo
from shared.wire.link import LinkOffer
from shared.wire.security import TOKEN_METADATA_KEY, TLSFiles

_SERVICE = pb.DESCRIPTOR.services_by_name["EncodeService"].full_name
# A replica that went away must cost a call milliseconds, not gRPC's default 20 s connect timeout:
# reconnects start after 100 ms and back off to at most 1 s, and a connection attempt (TCP + TLS +
# HTTP/2 settings) that takes longer than 1 s fails and is retried (min_reconnect_backoff is
# also the minimum connect timeout).
_FAIL_FAST_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),  # retries are the client's, on another replica
    # A connection of its own per stub, not one shared with other channels to the same address
    # (gRPC's process-wide pool), whose backoff after an old failure would fail new calls.
    ("grpc.use_local_subchannel_pool", 1),
)
_DOWN_STATES = frozenset(
    {grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN}
)


class ErrorKind(enum.Enum):
    """What a failed call means for the caller."""

    INVALID = "invalid"  # the image or request is bad: retrying elsewhere cannot help
    NOT_FOUND = "not_found"  # a ticket or a hash-only image is unknown to the replica
    UNKNOWN_LINK = "unknown_link"  # the replica forgot the link: open a new one
    OVERLOADED = "overloaded"  # its queue is full: try another replica
    UNAVAILABLE = "unavailable"  # down, loading or draining: try another replica
    DEADLINE = "deadline"
    LINK_BROKEN = "link_broken"  # the link failed mid-transfer: retry over a new link
    UNAUTHENTICATED = "unauthenticated"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


_KINDS = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: ErrorKind.INVALID,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.UNKNOWN_LINK,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE,
    grpc.StatusCode.ABORTED: ErrorKind.LINK_BROKEN,
    grpc.StatusCode.UNAUTHENTICATED: ErrorKind.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorKind.UNAUTHENTICATED,
    grpc.StatusCode.CANCELLED: ErrorKind.CANCELLED,
}


class RemoteError(RuntimeError):
    """A call to an encode replica failed; `kind` says how to react."""

    def __init__(self, kind: ErrorKind, message: str, endpoint: str):
        super().__init__(f"{endpoint}: {kind.value}: {message}")
        self.kind = kind
        self.detail = message
        self.endpoint = endpoint


@dataclass(frozen=True)
class ImageHeader:
    """What precedes an image's tensor (inline) or names it (link ticket)."""

    index: int
    grid_thw: tuple[int, int, int]
    dtype: str
    shape: tuple[int, ...]
    num_bytes: int
    content_hash: str
    cache_hit: bool
    ticket: int
    checkpoint_id: str
    timestamps: tuple[float, ...] = ()  # a video's group times


def check_checkpoint(header: ImageHeader, expected: str | None, endpoint: str) -> None:
    """Refuse embeddings from a replica that now serves another checkpoint (it restarted with
    other weights behind the same address; the channel reconnected without telling us)."""
    if expected is not None and header.checkpoint_id != expected:
        raise IncompatibleEncoderError(
            f"encode replica {endpoint} now serves checkpoint {header.checkpoint_id!r}, "
            f"not {expected!r}"
        )


def _header(message: pb.ImageHeader) -> ImageHeader:
    return ImageHeader(
        message.index,
        tuple(message.grid_thw),
        message.dtype,
        tuple(message.shape),
        message.num_bytes,
        message.content_hash,
        message.cache_hit,
        message.ticket,
        message.checkpoint_id,
        tuple(message.timestamps),
    )


_CAP = {None: pb.CAP_PIXELS_DEFAULT, False: pb.CAP_PIXELS_OFF, True: pb.CAP_PIXELS_ON}


def _image_message(ref: ImageRef) -> pb.ImageInput:
    msg = pb.ImageInput(
        content_hash=ref.content_hash or "",
        min_pixels=ref.min_pixels or 0,
        max_pixels=ref.max_pixels or 0,
    )
    if ref.data is not None:
        msg.data = ref.data
    elif ref.url is not None:
        msg.url = ref.url
    if ref.video is not None:
        msg.video.CopyFrom(
            pb.VideoOptions(
                fps=ref.video.fps or 0.0,
                num_frames=ref.video.num_frames or 0,
                cap_pixels_per_frame=_CAP[ref.video.cap_pixels_per_frame],
                frames=list(ref.frames),
                frames_fps=ref.video.frames_fps or 0.0,
            )
        )
    return msg


def _parse_encode_response(frame: bytes):
    # Tensor chunks are read straight from the frame; headers go through the generated class.
    return parse_chunk_frame(frame) or pb.EncodeResponse.FromString(frame)


class EncodeStub:
    """One replica's channel and calls, in domain types."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        token: str | None = None,
        tls: TLSFiles | None = None,
    ):
        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *_FAIL_FAST_OPTIONS,
        ]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        # Sent on every call; the encode service refuses calls without it when it has a token.
        self._metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
        self._stub = pb_grpc.EncodeServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._encode = self._channel.unary_stream(
            f"/{_SERVICE}/Encode",
            request_serializer=pb.EncodeRequest.SerializeToString,
            response_deserializer=_parse_encode_response,
        )

    def _call_args(self, timeout: float) -> dict:
        # wait_for_ready=False: a call on a channel that cannot connect fails now (UNAVAILABLE)
        # instead of waiting for the replica to come back.
        return {"timeout": timeout, "metadata": self._metadata, "wait_for_ready": False}

    def reachable(self) -> bool:
        """False when the channel knows the replica is down (its last connect failed)."""
        return self._channel.get_state(try_to_connect=False) not in _DOWN_STATES

    async def serving(self, timeout: float) -> bool:
        """The replica's grpc.health.v1 status is SERVING (False on any failure)."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=_SERVICE), **self._call_args(timeout)
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _error(self, exc: grpc.aio.AioRpcError) -> RemoteError:
        kind = _KINDS.get(exc.code(), ErrorKind.INTERNAL)
        return RemoteError(kind, f"{exc.code().name}: {exc.details()}", self.address)

    async def encode_inline(
        self, ref: ImageRef, request_id: str, max_chunk_bytes: int, timeout: float
    ) -> AsyncIterator[ImageHeader | ChunkView]:
        """The image's header, then its tensor chunks (views into the received frames)."""
        request = pb.EncodeRequest(
            request_id=request_id,
            images=[_image_message(ref)],
            transport=pb.TRANSPORT_INLINE,
            max_chunk_bytes=max_chunk_bytes,
        )
        try:
            async for msg in self._encode(request, **self._call_args(timeout)):
                if isinstance(msg, ChunkView):
                    yield msg
                elif msg.WhichOneof("payload") == "header":
                    yield _header(msg.header)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def encode_for_link(
        self,
        ref: ImageRef,
        request_id: str,
        link_id: str | None,
        timeout: float,
        region: tuple[str, int, int] | None = None,
    ) -> list[ImageHeader]:
        """Headers whose tickets the replica holds for a transfer over `link_id` (None: for
        shared memory: written into `region` (pool id, offset, capacity) when it fits, ticket 0,
        else a ticket for CopyToShm)."""
        request = pb.EncodeRequest(
            request_id=request_id,
            images=[_image_message(ref)],
            transport=pb.TRANSPORT_LINK if link_id is not None else pb.TRANSPORT_SHM,
            link_id=link_id or "",
        )
        if region is not None:
            pool_id, offset, capacity = region
            request.shm.CopyFrom(pb.ShmRegion(pool_id=pool_id, offset=offset, capacity=capacity))
        try:
            call = self._encode(request, **self._call_args(timeout))
            return [_header(m.header) async for m in call]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    def open_shm(self, path: str, size: int):
        """The OpenShm stream: its first message names the pool; cancel it to unmap the pool."""
        return self._stub.OpenShm(pb.OpenShmRequest(path=path, size=size), metadata=self._metadata)

    async def first_pool_id(self, call, timeout: float) -> str:
        try:
            reply = await asyncio.wait_for(call.read(), timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        if reply is grpc.aio.EOF:
            raise RemoteError(ErrorKind.INTERNAL, "OpenShm ended at once", self.address)
        return reply.pool_id

    async def copy_to_shm(
        self, pool_id: str, ticket: int, offset: int, capacity: int, timeout: float
    ) -> int:
        request = pb.CopyToShmRequest(
            pool_id=pool_id, ticket=ticket, offset=offset, capacity=capacity
        )
        try:
            reply = await self._stub.CopyToShm(request, **self._call_args(timeout))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return reply.num_bytes

    async def info(self, timeout: float) -> EncoderInfo:
        try:
            msg = await self._stub.GetInfo(pb.GetInfoRequest(), **self._call_args(timeout))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        flat = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
        return EncoderInfo.from_flat_dict(flat)

    async def open_link(self, device: str, timeout: float) -> LinkOffer:
        try:
            msg = await self._stub.OpenLink(
                pb.OpenLinkRequest(device=device), **self._call_args(timeout)
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return LinkOffer(
            msg.link_id,
            msg.store_host,
            msg.store_port,
            msg.backend,
            msg.rank,
            msg.timeout_s,
            msg.secret,
        )

    def transfer(self, link_id: str, tickets: list[int], timeout: float) -> TransferCall:
        call = self._stub.Transfer(
            pb.TransferRequest(link_id=link_id, tickets=tickets), **self._call_args(timeout)
        )
        return TransferCall(self, call)

    async def close_link(self, link_id: str, timeout: float = 2.0) -> None:
        """Best effort: the replica may already be gone, and its side of the link with it."""
        try:
            await self._stub.CloseLink(
                pb.CloseLinkRequest(link_id=link_id), **self._call_args(timeout)
            )
        except grpc.aio.AioRpcError:
            pass

    async def close(self) -> None:
        await self._channel.close()


class TransferCall:
    """A Transfer stream: `ready()` once the replica posts its sends, `done()` when they end."""

    def __init__(self, stub: EncodeStub, call):
        self._stub = stub
        self._call = call

    async def _read(self, stage: str) -> None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._stub._error(exc) from exc
        if msg is grpc.aio.EOF or msg.WhichOneof("stage") != stage:
            raise RemoteError(
                ErrorKind.LINK_BROKEN, f"transfer ended before {stage}", self._stub.address
            )

    async def ready(self) -> None:
        await self._read("ready")

    async def done(self) -> None:
        await self._read("done")

    def cancel(self) -> None:
        self._call.cancel()
