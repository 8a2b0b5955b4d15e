"""gRPC method handlers both services build by hand: requests arrive as bytes and are parsed
here, so a message that does not parse is INVALID_ARGUMENT with a message. The generated
deserializer would fail before the servicer runs, and gRPC answers that with UNKNOWN or
INTERNAL, which reads as a bug in the service, not in the call."""

from __future__ import annotations

import grpc


def serialize_response(message) -> bytes:
    # The encode service's tensor chunks arrive pre-serialized.
    return message if isinstance(message, bytes) else message.SerializeToString()


async def parse_request(raw: bytes, request_type, context):
    """The request message, or the call aborted with INVALID_ARGUMENT."""
    try:
        return request_type.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, and anything its parser raises
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed {request_type.DESCRIPTOR.full_name} message: {exc}",
        )


def unary(method, request_type) -> grpc.RpcMethodHandler:
    async def handle(raw: bytes, context):
        return await method(await parse_request(raw, request_type, context), context)

    return grpc.unary_unary_rpc_method_handler(handle, None, serialize_response)


def unary_stream(method, request_type) -> grpc.RpcMethodHandler:
    async def handle(raw: bytes, context):
        request = await parse_request(raw, request_type, context)
        async for message in method(request, context):
            yield message

    return grpc.unary_stream_rpc_method_handler(handle, None, serialize_response)
