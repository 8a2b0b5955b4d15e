"""Receiving an image's packed embeddings inline: the tensor bytes in the Encode stream itself.

Copies, client side: a tensor that fits one chunk (the client asks for whole tensors when its
receive limit allows) is used in place as a view of the received message, with no copy of our
own; a chunked one is copied once, chunk by chunk as they arrive, into a buffer allocated on
the first (pinned when the engine runs on CUDA, so the runner's one host-to-device copy can be
asynchronous). The runner makes that host-to-device copy, once per request.
"""

from __future__ import annotations

import torch

from services.language.encoder.rpc import EncodeStub, ImageHeader, check_checkpoint
from shared.wire.codec import ChunkView, TensorAssembler, wire_dtype
from shared.wire.errors import WireFormatError
from shared.wire.images import EncodedImage, ImageRef


async def receive_inline(
    stub: EncodeStub,
    ref: ImageRef,
    request_id: str,
    max_chunk_bytes: int,
    timeout: float,
    pin_memory: bool,
    checkpoint_id: str | None = None,
) -> EncodedImage:
    """Encode one image and assemble its tensor from the stream (on the host)."""
    header: ImageHeader | None = None
    assembler: TensorAssembler | None = None
    async for item in stub.encode_inline(ref, request_id, max_chunk_bytes, timeout):
        if isinstance(item, ChunkView):
            if assembler is None:
                raise WireFormatError(f"{stub.address}: tensor chunk before its header")
            assembler.write(item.offset, item.data)
        else:
            if header is not None:
                raise WireFormatError(f"{stub.address}: two headers for one image")
            header = item
            check_checkpoint(header, checkpoint_id, stub.address)
            assembler = TensorAssembler(
                wire_dtype(header.dtype), header.shape, header.num_bytes, pin_memory
            )
    if header is None:
        raise WireFormatError(f"{stub.address} returned no image")
    packed: torch.Tensor = assembler.result()
    return EncodedImage(
        packed,
        header.grid_thw,
        header.content_hash,
        header.cache_hit,
        stub.address,
        timestamps=header.timestamps,
    )
