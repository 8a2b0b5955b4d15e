"""How an EncodeClient reaches and uses the encode replicas: frozen, built once from flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.wire.info import EncoderContract
from shared.wire.security import TLSFiles

# grpc: inline bytes; nccl: a torch.distributed link (gloo on CPU devices); ipc: shared
# memory with a replica on this host (inline where it cannot be); auto: ipc on a CPU, else grpc
TRANSPORTS = ("grpc", "nccl", "ipc", "auto")
_FRAME_OVERHEAD = 1024  # a chunk message's bytes besides its data, with room to spare


@dataclass(frozen=True)
class EncodeClientConfig:
    """Endpoints (host:port) and behaviour of an EncodeClient."""

    endpoints: tuple[str, ...]
    transport: str = "grpc"  # one of TRANSPORTS
    device: str = "cpu"  # where link transfers land (inline tensors stay on the host)
    timeout_s: float = 60.0  # per request, all attempts included
    # Per attempt (never more than what is left of the request's timeout_s).
    attempt_timeout_s: float = 15.0
    max_attempts: int = 3  # per image
    cooldown_s: float = 2.0  # a replica that was unavailable or too slow is avoided this long
    probe_interval_s: float = 0.5  # after the cool-down, health probes this often until SERVING
    probe_timeout_s: float = 1.0
    max_message_bytes: int = 256 * 1024 * 1024  # gRPC receive limit
    # Inline tensors arrive in chunks of this size, reassembled as they come (bench/transfer.py:
    # the pipelining beats the copy it costs). 0 asks for each tensor in one message (up to
    # max_message_bytes), then used in place without any copy of the client's own.
    inline_chunk_bytes: int = 1024 * 1024
    expected: EncoderContract | None = None  # None: replicas are not checked
    # An image to the replica its content hashes to (cache affinity across language replicas);
    # False: always the least loaded
    affinity: bool = True
    ipc_pool_bytes: int = 256 * 1024 * 1024  # the shared-memory pool per replica (ipc)
    internal_token: str | None = field(default=None, repr=False)  # the encode service's
    # TLS to the replicas: the CA they are verified by (None: the system's roots) and, for mutual
    # TLS, this client's certificate and key. None: plaintext.
    tls: TLSFiles | None = None

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
        for name in ("attempt_timeout_s", "probe_interval_s", "probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
