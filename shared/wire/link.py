"""A point-to-point torch.distributed link between an encode process and a language process.

A two-rank process group object built from a PrefixStore over a TCPStore, NCCL on CUDA devices
and gloo on CPU through the same code; several links per process, no default group. Data moves
by send/recv; control (tickets, shapes, dtypes) stays on gRPC.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.wire.errors import LinkError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkOffer:
    """How a peer joins a link the offering process opened: as `rank` of two, through the
    TCPStore at store_host:store_port, under `link_id` as the store prefix."""

    link_id: str
    store_host: str
    store_port: int
    backend: str
    rank: int
    timeout_s: float


def link_backend(device: torch.device | str) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_address_towards(host: str, port: int) -> str:
    """The local IP address whose route reaches host (no packet is sent)."""
    try:
        family = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def start_store_server(host: str, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server on host and a free port (store.port), for link rendezvous."""
    return dist.TCPStore(
        host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the encode service's TCPStore."""
    try:
        return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # torch raises DistStoreError / RuntimeError
        raise LinkError(f"cannot reach the link store at {host}:{port}: {exc}") from exc


def _new_group(
    store: dist.Store, rank: int, device: torch.device, timeout: datetime.timedelta, bind_host: str
):
    if link_backend(device) == "nccl":
        if not dist.is_nccl_available():
            raise LinkError("device is CUDA but this torch build has no NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def join_link(
    link_id: str,
    store_host: str,
    store_port: int,
    rank: int,
    device: torch.device | str,
    timeout_s: float,
) -> P2PLink:
    """The peer's side: connect to the offering process's store and join its link (blocking)."""
    store = connect_store(store_host, store_port, timeout_s)
    bind_host = local_address_towards(store_host, store_port)
    return P2PLink(link_id, store, rank, device, timeout_s, bind_host)


def transfer_tag(ticket: int) -> int:
    """Tag for a ticket's send/recv (gloo matches on it; NCCL relies on order)."""
    return ticket % (2**31 - 1)


class P2PLink:
    """A two-rank process group between an encode process (rank 0) and a language process (rank 1).

    Construction blocks until the peer joins (run it off the event loop). send/recv hold a per-link
    lock, so the transfers of concurrent requests never interleave; the first failure marks the link
    broken, closes it and raises LinkError, and every later call fails fast.
    """

    def __init__(
        self,
        link_id: str,
        store: dist.Store,
        rank: int,
        device: torch.device | str,
        timeout_s: float,
        bind_host: str = "127.0.0.1",
    ):
        if rank not in (0, 1):
            raise ValueError(f"a link has ranks 0 and 1, got {rank}")
        self.link_id = link_id
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device(device)
        self.backend = link_backend(self.device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._lock = threading.Lock()
        self._broken: str | None = None
        prefixed = dist.PrefixStore(f"splitvl/link/{link_id}/", store)
        try:
            self._group = _new_group(prefixed, rank, self.device, self.timeout, bind_host)
        except LinkError:
            raise
        except Exception as exc:
            raise LinkError(
                f"link {link_id}: rendezvous with rank {self.peer} failed: {exc}"
            ) from exc
        log.info("link %s up: rank %d, %s on %s", link_id, rank, self.backend, self.device)

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def send(self, tensors: Sequence[torch.Tensor], tags: Sequence[int]) -> int:
        """Send each tensor's bytes, in order; returns the byte count. Blocks until done."""
        with self._lock:
            self._check()
            total = 0
            try:
                for tensor, tag in zip(tensors, tags, strict=True):
                    data = self._as_bytes(tensor)
                    self._group.send([data], self.peer, tag).wait(self.timeout)
                    total += data.numel()
            except Exception as exc:
                raise self._fail("send", exc) from exc
            return total

    def recv(
        self, specs: Sequence[tuple[Sequence[int], torch.dtype]], tags: Sequence[int]
    ) -> list[torch.Tensor]:
        """Receive one tensor per (shape, dtype) spec, in order, on this link's device."""
        with self._lock:
            self._check()
            out = []
            try:
                for (shape, dtype), tag in zip(specs, tags, strict=True):
                    tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
                    self._group.recv([self._as_bytes(tensor)], self.peer, tag).wait(self.timeout)
                    out.append(tensor)
            except Exception as exc:
                raise self._fail("recv", exc) from exc
            return out

    def close(self, reason: str = "closed") -> None:
        """Release the process group; idempotent."""
        if self._broken is None:
            self._broken = reason
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # a broken group may refuse a clean shutdown; it is dropped anyway
                log.debug("link %s: shutdown raised", self.link_id, exc_info=True)

    def _as_bytes(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            tensor = tensor.to(self.device)
        return tensor.contiguous().view(-1).view(torch.uint8)

    def _check(self) -> None:
        if self._broken is not None:
            raise LinkError(f"link {self.link_id} is unusable ({self._broken}); open a new one")

    def _fail(self, op: str, exc: Exception) -> LinkError:
        reason = f"{op} failed: {exc}"
        log.warning("link %s broken: %s", self.link_id, reason)
        self.close(reason)
        return LinkError(f"link {self.link_id} broke during {op} with rank {self.peer}: {exc}")
