"""The encode process's life: bind (health NOT_SERVING), load the vision tower (SERVING), and on
SIGTERM drain (NOT_SERVING, new work refused, in-flight calls and unredeemed tickets finished),
then exit. Start-up problems a user can fix are one log line and exit status 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.errors import StartupError
from services.common.port_file import write_port_file
from services.encode.config import EncodeServiceConfig
from services.encode.metrics import EncodeMetrics
from services.encode.runtime import load_runtime
from services.encode.security import TokenInterceptor, server_credentials
from services.encode.server import MAX_SEND_MESSAGE_BYTES, SERVICE_NAME, EncodeServicer

log = logging.getLogger(__name__)

_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class EncodeServer:
    """The encode process: gRPC server, health, metrics endpoint, model and drain."""

    def __init__(self, config: EncodeServiceConfig):
        self.config = config
        self.metrics = EncodeMetrics()
        self.servicer = EncodeServicer(config, self.metrics)
        self.health = HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._draining_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until load()); returns the bound port.

        Raises StartupError, with the server stopped, when a port or the port file is unusable.
        """
        max_bytes = self.config.limits.max_request_bytes
        interceptors = []
        if self.config.internal_token is not None:
            interceptors.append(TokenInterceptor(self.config.internal_token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
                # Without this a second replica started on a taken port would bind it too and
                # silently take half of its connections.
                ("grpc.so_reuseport", 0),
            ],
        )
        self._server = server
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, _HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        self.port = self._bind(server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        if self.config.metrics_port is not None:
            try:
                self.servicer.metrics_port = self.metrics.serve_http(
                    self.config.host, self.config.metrics_port
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: "
                    f"{exc.strerror or exc}; choose another --metrics-port (0 picks a free one)"
                ) from None
            log.info(
                "metrics on http://%s:%d/metrics", self.config.host, self.servicer.metrics_port
            )
        scheme = "TLS" if self.config.tls is not None else "plaintext"
        auth = "token required" if self.config.internal_token is not None else "no token"
        log.info("listening on %s:%d (%s, %s)", self.config.host, self.port, scheme, auth)
        if self.config.port_file is not None:
            info = {"port": self.port, "metrics_port": self.servicer.metrics_port}
            try:
                write_port_file(self.config.port_file, info)
            except OSError as exc:
                raise StartupError(
                    f"cannot write --port-file {self.config.port_file}: {exc.strerror or exc}"
                ) from None
        return self.port

    def _bind(self, server: grpc.aio.Server) -> int:
        host = self.config.host
        address = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        in_use = StartupError(
            f"cannot listen on {address}: the port is in use or the address is not local; "
            "choose another --port (0 picks a free one) or --host"
        )
        if self.config.port and not _can_bind(host, self.config.port):
            raise in_use  # checked here first: gRPC's own failure is a multi-line C-core log
        try:
            if self.config.tls is not None:
                port = server.add_secure_port(address, server_credentials(self.config.tls))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpc raises on a failed bind in recent releases
            port = 0
        if port == 0:
            raise in_use
        return port

    async def load(self) -> None:
        """Load the model on a thread, start batching, then report SERVING."""
        runtime = await asyncio.to_thread(load_runtime, self.config, self.metrics)
        runtime.batcher.start()
        # Read live at each scrape, from the event loop's objects (plain int reads).
        self.metrics.queue_depth.set_function(lambda: runtime.batcher.queue_depth)
        self.metrics.links.set_function(lambda: runtime.links.num_links)
        self.metrics.shm_pools.set_function(lambda: len(self.servicer.shm))
        self.servicer.runtime = runtime
        if self.servicer.draining:
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving")

    def request_drain(self, reason: str) -> None:
        """Start draining (idempotent); safe to call from a signal handler."""
        if self._draining_task is None:
            self._draining_task = asyncio.ensure_future(self.drain(reason))

    async def drain(self, reason: str) -> None:
        """NOT_SERVING, refuse new work, finish in-flight calls and tickets, then stop."""
        self.servicer.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        rt = self.servicer.runtime
        log.info(
            "%s: draining %d call(s), %d ticket(s)",
            reason,
            self.servicer.active_calls,
            rt.links.pending_tickets if rt else 0,
        )
        deadline = time.monotonic() + self.config.drain_timeout_s
        while time.monotonic() < deadline and not self._idle():
            await asyncio.sleep(0.05)
        if not self._idle():
            log.warning(
                "drain timed out after %.0f s; stopping anyway", self.config.drain_timeout_s
            )
        await self.stop()

    def _idle(self) -> bool:
        rt = self.servicer.runtime
        return self.servicer.active_calls == 0 and (rt is None or rt.links.pending_tickets == 0)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
        rt = self.servicer.runtime
        if rt is not None:
            await rt.batcher.close()
            rt.encoder.close()
            rt.links.close_all()
        log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def _can_bind(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                return False
    return True


# Load failures a user can fix (missing weights, a device that is not there): one line each.
_LOAD_ERRORS = (ValueError, OSError, KeyError)


async def serve(config: EncodeServiceConfig) -> int:
    """Run the encode service until SIGTERM/SIGINT has drained it; returns the exit status."""
    server = EncodeServer(config)
    try:
        await server.start()
    except StartupError as exc:
        log.error("cannot start the encode service: %s", exc)
        await server.stop()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_drain, signal.Signals(sig).name)
    try:
        await server.load()
    except _LOAD_ERRORS as exc:
        log.error("could not load the model from %s: %s", config.model_dir, exc)
        await server.stop()
        return 1
    except Exception:
        log.exception("could not load the model from %s", config.model_dir)
        await server.stop()
        return 1
    await server.wait_stopped()
    return 0
