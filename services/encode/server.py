"""gRPC adapter of the encode service (the only module that touches the generated protobuf code).

Maps EncodeService calls onto VisionEncoder and LinkManager and typed errors onto status codes;
requests arrive as bytes and are parsed here, so a malformed one is INVALID_ARGUMENT. The
process's life (bind, load, drain) is `lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from proto.splitvl.encode.v1 import encode_pb2 as pb
from services.common.grpc_handlers import unary, unary_stream
from services.encode.batcher import BatcherClosedError, DeadlineExpiredError, VisionQueueFullError
from services.encode.config import EncodeServiceConfig
from services.encode.encoder import InvalidImageError, NotCachedError
from services.encode.links import LinkLimitError, TicketError, UnknownLinkError
from services.encode.metrics import EncodeMetrics
from services.encode.runtime import Runtime
from services.encode.shm import ShmPools, UnknownPoolError
from shared.wire.codec import iter_chunk_frames, tensor_bytes
from shared.wire.errors import ImageRefError, LinkError, WireFormatError
from shared.wire.images import EncodedImage, ImageRef, VideoSampling
from shared.wire.info import EncoderInfo
from shared.wire.shm import ShmError
from shared.wire.units import dtype_name

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EncodeService"].full_name


# Whole tensors in one message for callers that ask (EncodeRequest.max_chunk_bytes).
MAX_SEND_MESSAGE_BYTES = 1 << 30
MIN_CHUNK_BYTES = 4096


class UnavailableError(RuntimeError):
    """The replica is loading or draining; the client should use another one."""


# Most specific first: the code a client sees for each typed error.
_STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageRefError, grpc.StatusCode.INVALID_ARGUMENT),
    (WireFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotCachedError, grpc.StatusCode.NOT_FOUND),
    (TicketError, grpc.StatusCode.NOT_FOUND),
    # Distinct from NOT_FOUND so a client knows to open a new link and retry.
    (UnknownLinkError, grpc.StatusCode.FAILED_PRECONDITION),
    (VisionQueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LinkLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownPoolError, grpc.StatusCode.FAILED_PRECONDITION),
    (ShmError, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (LinkError, grpc.StatusCode.ABORTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _STATUS_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


_CAP = {pb.CAP_PIXELS_DEFAULT: None, pb.CAP_PIXELS_OFF: False, pb.CAP_PIXELS_ON: True}


def _image_ref(image: pb.ImageInput) -> ImageRef:
    source = image.WhichOneof("source")
    video = frames = None
    if image.HasField("video"):
        options = image.video
        video = VideoSampling(
            fps=options.fps or None,
            num_frames=options.num_frames or None,
            cap_pixels_per_frame=_CAP.get(options.cap_pixels_per_frame),
            frames_fps=options.frames_fps or None,
        )
        frames = tuple(options.frames)
    return ImageRef(
        data=image.data if source == "data" else None,
        url=image.url if source == "url" else None,
        content_hash=image.content_hash or None,
        min_pixels=image.min_pixels or None,
        max_pixels=image.max_pixels or None,
        video=video,
        frames=frames or (),
    )


def _header(
    index: int, img: EncodedImage, checkpoint_id: str, ticket: int = 0
) -> pb.EncodeResponse:
    packed = img.packed
    return pb.EncodeResponse(
        header=pb.ImageHeader(
            index=index,
            grid_thw=list(img.grid_thw),
            num_tokens=packed.shape[0],
            dtype=dtype_name(packed.dtype),
            shape=list(packed.shape),
            content_hash=img.content_hash,
            cache_hit=img.cache_hit,
            num_bytes=packed.numel() * packed.element_size(),
            ticket=ticket,
            checkpoint_id=checkpoint_id,
            timestamps=list(img.timestamps),
        )
    )


def _info_message(info: EncoderInfo, metrics_port: int) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(**{**info.as_flat_dict(), "metrics_port": metrics_port})


class EncodeServicer:
    """The EncodeService methods; `runtime` is None until the model is loaded."""

    def __init__(self, config: EncodeServiceConfig, metrics: EncodeMetrics):
        self.config = config
        self.metrics = metrics
        self.runtime: Runtime | None = None
        self.draining = False
        self.active_calls = 0
        self.metrics_port = 0
        self.shm = ShmPools(config.max_links)

    @contextlib.contextmanager
    def _active(self):
        self.active_calls += 1
        try:
            yield
        finally:
            self.active_calls -= 1

    def _ready(self, accepting_new_work: bool = True) -> Runtime:
        if self.runtime is None:
            raise UnavailableError("the encode service is still loading its model; retry shortly")
        if accepting_new_work and self.draining:
            raise UnavailableError(
                "the encode service is draining for shutdown; use another replica"
            )
        return self.runtime

    async def _abort(self, context, exc: Exception, method: str) -> None:
        code = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed unexpectedly", method)
        else:
            log.info("%s: %s: %s", method, code.name, exc)
        await context.abort(code, str(exc))

    async def Encode(self, request: pb.EncodeRequest, context):  # noqa: N802 (gRPC naming)
        start, code = time.perf_counter(), "OK"
        self.metrics.inflight.inc()
        try:
            with self._active():
                rt = self._ready()
                link = request.transport == pb.TRANSPORT_LINK
                ticketed = link or request.transport == pb.TRANSPORT_SHM
                if link and not rt.links.is_open(request.link_id):
                    raise UnknownLinkError(f"no open link {request.link_id!r}; call OpenLink first")
                refs = [_image_ref(image) for image in request.images]
                chunk_bytes = self._chunk_bytes(request.max_chunk_bytes)
                remaining = context.time_remaining()
                deadline = (
                    None if remaining is None else asyncio.get_running_loop().time() + remaining
                )
                hits = 0
                async with contextlib.aclosing(rt.encoder.encode(refs, deadline)) as results:
                    async for index, img in results:
                        region = request.shm if request.HasField("shm") and len(refs) == 1 else None
                        emit = self._emit(rt, index, img, ticketed, chunk_bytes, region)
                        async for message in emit:
                            yield message
                        self.metrics.images.inc()
                        hits += img.cache_hit
                log.info(
                    "Encode %s: %d image(s), %d cached, %s, %.1f ms",
                    request.request_id or "-",
                    len(refs),
                    hits,
                    pb.Transport.Name(request.transport or pb.TRANSPORT_INLINE)[10:].lower(),
                    (time.perf_counter() - start) * 1e3,
                )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_for(exc).name
            await self._abort(context, exc, "Encode")
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(code).inc()
            self.metrics.latency.observe(time.perf_counter() - start)

    def _chunk_bytes(self, requested: int) -> int:
        if requested == 0:
            return self.config.chunk_bytes
        # Frames carry a few dozen bytes besides the data.
        return max(MIN_CHUNK_BYTES, min(requested, MAX_SEND_MESSAGE_BYTES - 1024))

    async def _emit(
        self,
        rt: Runtime,
        index: int,
        img: EncodedImage,
        ticketed: bool,
        chunk_bytes: int,
        region: pb.ShmRegion | None = None,
    ):
        nbytes = img.packed.numel() * img.packed.element_size()
        if region is not None and nbytes <= region.capacity:
            # Straight into the caller's pool: the header's ticket 0 says the bytes are there
            write = self.shm.write
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, write, region.pool_id, region.offset, img.packed)
            self.metrics.transfer_bytes.labels("shm").inc(nbytes)
            yield _header(index, img, rt.info.contract.checkpoint_id)
            return
        if ticketed:
            # No copy: the ticket holds the cached tensor itself until Transfer or CopyToShm
            # reads it.
            ticket = rt.links.issue(img.packed)
            yield _header(index, img, rt.info.contract.checkpoint_id, ticket)
            return
        yield _header(index, img, rt.info.contract.checkpoint_id)
        if img.packed.device.type == "cpu":
            data = tensor_bytes(img.packed)
        else:  # the device-to-host copy must not stall the event loop
            data = await asyncio.get_running_loop().run_in_executor(None, tensor_bytes, img.packed)
        for frame in iter_chunk_frames(index, data, chunk_bytes):
            yield frame
        self.metrics.transfer_bytes.labels("inline").inc(len(data))

    async def Transfer(self, request: pb.TransferRequest, context):  # noqa: N802
        try:
            with self._active():
                rt = self._ready(accepting_new_work=False)
                if not rt.links.is_open(request.link_id):
                    raise UnknownLinkError(f"no open link {request.link_id!r}; call OpenLink again")
                tickets = list(request.tickets)
                tensors = rt.links.take(tickets)
                yield pb.TransferResponse(ready=pb.TransferReady(num_tensors=len(tensors)))
                num_bytes = await rt.links.send(request.link_id, tickets, tensors)
                self.metrics.transfer_bytes.labels("link").inc(num_bytes)
                yield pb.TransferResponse(done=pb.TransferDone(num_bytes=num_bytes))
        except Exception as exc:
            await self._abort(context, exc, "Transfer")

    async def OpenLink(self, request: pb.OpenLinkRequest, context):  # noqa: N802
        try:
            offer = self._ready().links.open(request.device)
        except Exception as exc:
            await self._abort(context, exc, "OpenLink")
        return pb.OpenLinkResponse(
            link_id=offer.link_id,
            store_host=offer.store_host,
            store_port=offer.store_port,
            backend=offer.backend,
            rank=offer.rank,
            timeout_s=offer.timeout_s,
            secret=offer.secret,
        )

    async def CloseLink(self, request: pb.CloseLinkRequest, context):  # noqa: N802
        try:
            rt = self._ready(accepting_new_work=False)
        except Exception as exc:
            await self._abort(context, exc, "CloseLink")
        if not rt.links.close(request.link_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no open link {request.link_id!r}")
        return pb.CloseLinkResponse()

    async def OpenShm(self, request: pb.OpenShmRequest, context):  # noqa: N802
        try:
            self._ready()
            pool_id = self.shm.open(request.path, request.size)
        except Exception as exc:
            await self._abort(context, exc, "OpenShm")
            return
        try:
            yield pb.OpenShmResponse(pool_id=pool_id)
            await asyncio.Event().wait()  # until the client ends the stream (or dies)
        finally:
            self.shm.close(pool_id)

    async def CopyToShm(self, request: pb.CopyToShmRequest, context):  # noqa: N802
        try:
            with self._active():
                rt = self._ready(accepting_new_work=False)
                (tensor,) = rt.links.take([request.ticket])
                nbytes = tensor.numel() * tensor.element_size()
                if nbytes > request.capacity:
                    raise ShmError(f"the tensor is {nbytes} bytes, the region {request.capacity}")
                loop = asyncio.get_running_loop()
                write = self.shm.write
                await loop.run_in_executor(None, write, request.pool_id, request.offset, tensor)
                self.metrics.transfer_bytes.labels("shm").inc(nbytes)
        except Exception as exc:
            await self._abort(context, exc, "CopyToShm")
        return pb.CopyToShmResponse(num_bytes=nbytes)

    async def GetInfo(self, request: pb.GetInfoRequest, context):  # noqa: N802
        try:
            info = self._ready(accepting_new_work=False).info
        except Exception as exc:
            await self._abort(context, exc, "GetInfo")
        return _info_message(info, self.metrics_port)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context):  # noqa: N802
        return pb.GetMetricsResponse(text=self.metrics.render())

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers built by hand: requests arrive as bytes and are parsed here (a bad
        message is INVALID_ARGUMENT), and Encode can send pre-serialized tensor chunks."""
        handlers = {
            "Encode": unary_stream(self.Encode, pb.EncodeRequest),
            "Transfer": unary_stream(self.Transfer, pb.TransferRequest),
            "OpenShm": unary_stream(self.OpenShm, pb.OpenShmRequest),
        }
        for name, request_type in (
            ("GetInfo", pb.GetInfoRequest),
            ("OpenLink", pb.OpenLinkRequest),
            ("CloseLink", pb.CloseLinkRequest),
            ("CopyToShm", pb.CopyToShmRequest),
            ("GetMetrics", pb.GetMetricsRequest),
        ):
            handlers[name] = unary(getattr(self, name), request_type)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
