"""Who may call the encode service: the internal-token check and the server's TLS credentials.

The token check is a server interceptor, so it runs before any request bytes are parsed and covers
every method (reflection included) except the standard health service, which orchestrators and
load balancers probe without credentials.
"""

from __future__ import annotations

import logging

import grpc

from shared.wire.security import TOKEN_METADATA_KEY, TLSFiles, secrets_match

log = logging.getLogger(__name__)

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) calls whose `x-splitvl-token` metadata is missing or wrong."""

    def __init__(self, token: str):
        self._token = token
        self.num_refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        supplied = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                supplied = value
        if secrets_match(supplied, self._token):
            return await continuation(handler_call_details)
        self.num_refused += 1
        # The value received is never logged: a near-miss token is still a secret.
        log.warning(
            "refused %s: %s internal token", method, "missing" if supplied is None else "wrong"
        )
        handler = await continuation(handler_call_details)
        return None if handler is None else _refusing(handler)


async def _refuse(request_or_iterator, context) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"missing or wrong '{TOKEN_METADATA_KEY}' metadata: this encode service requires its "
        "internal token (start the caller with the same --internal-token or --internal-token-file)",
    )


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that aborts without parsing the request."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse)
    return grpc.unary_unary_rpc_method_handler(_refuse)


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """TLS with the service's certificate; with a CA, clients must present a certificate it
    signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=tls.ca is not None
    )
