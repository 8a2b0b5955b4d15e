"""A point-to-point torch.distributed link between an encode process and a language process.

A two-rank process group object built from a PrefixStore over a TCPStore, NCCL on CUDA devices
and gloo on CPU through the same code; several links per process, no default group. Data moves
by send/recv; control (tickets, shapes, dtypes) stays on gRPC.

A stuck or dead peer must cost one call its timeout, never the process: on NCCL `Work.wait`
only makes the current stream wait, so every operation is also polled for completion until its
deadline (`complete`), and link groups are built with NCCL's asynchronous error handling in its
clean-up-only mode, so the watchdog aborts the communicator instead of the whole process. A
failed operation marks the link broken and aborts its group.

Joining needs the link's secret, which only travels over gRPC (OpenLink): anyone who reaches
the store's port can read and write its keys, so the peer claims the link with an HMAC of the
secret before the group forms, and once it has formed both ranks prove over the group itself that
they hold the secret (which also catches a third process that raced the rendezvous keys).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.wire.errors import LinkError, LinkRefusedError

log = logging.getLogger(__name__)

_NONCE_BYTES = 32
_DIGEST_BYTES = 32
# Tags of the in-group handshake; transfers use ticket % (2**31 - 1) and start after it.
_HANDSHAKE_TAG = 2**31 - 1
# NCCL's TORCH_NCCL_ASYNC_ERROR_HANDLING modes: 2 aborts a failed communicator and leaves the
# process alive (the default tears the process down), read once per group at its construction.
_NCCL_CLEAN_UP_ONLY = "2"
_NCCL_ENV_LOCK = threading.Lock()
_POLL_S = 0.0005


def complete(work, timeout: datetime.timedelta, clock=time.monotonic, sleep=time.sleep) -> None:
    """Wait for a send/recv to finish within `timeout`, or raise TimeoutError.

    gloo's `wait` blocks (and raises on its timeout); NCCL's returns at once with the work still
    queued, so completion is polled against the deadline as well: a peer that never answers
    costs the call its timeout, it cannot hang it."""
    deadline = clock() + timeout.total_seconds()
    work.wait(timeout)
    while not work.is_completed():
        if clock() >= deadline:
            raise TimeoutError(f"no completion within {timeout.total_seconds():.1f} s")
        sleep(_POLL_S)


@dataclass(frozen=True)
class LinkOffer:
    """How a peer joins a link the offering process opened: as `rank` of two, through the
    TCPStore at store_host:store_port, under `link_id` as the store prefix, proving `secret`."""

    link_id: str
    store_host: str
    store_port: int
    backend: str
    rank: int
    timeout_s: float
    secret: str = field(default="", repr=False)


def new_link_secret() -> str:
    """A fresh random secret for one link (hex)."""
    return secrets.token_hex(32)


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
    """A TCPStore server listening on host only, on a free port (store.port).

    TCPStore on its own listens on every interface; handing it a socket bound to the advertised
    address keeps the rendezvous off interfaces the operator did not choose.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.bind(address[:2] if family == socket.AF_INET else address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise LinkError(f"cannot listen for link rendezvous on {host}: {exc}") from exc
    port = sock.getsockname()[1]
    # The store owns the descriptor from here on.
    fd = sock.detach()
    return dist.TCPStore(
        host,
        port,
        None,
        True,
        datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=fd,
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the encode service's TCPStore."""
    try:
        return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # torch raises DistStoreError / RuntimeError
        raise LinkError(f"cannot reach the link store at {host}:{port}: {exc}") from exc


def _mac(secret: str, *parts: bytes) -> bytes:
    return hmac.new(secret.encode(), b"|".join(parts), hashlib.sha256).digest()


def join_proof(secret: str, link_id: str, nonce: str | None = None) -> str:
    """What a peer writes into the store to claim a link: a fresh nonce and an HMAC of it under
    the secret (so it reveals nothing of the secret, and no two claims are alike)."""
    nonce = nonce or secrets.token_hex(16)
    return f"{nonce}:{_mac(secret, b'splitvl-link-join', link_id.encode(), nonce.encode()).hex()}"


def _proof_is_valid(secret: str, link_id: str, claim: bytes) -> bool:
    nonce, _, _ = claim.decode("ascii", "replace").partition(":")
    return hmac.compare_digest(claim, join_proof(secret, link_id, nonce or "-").encode())


def _new_group(
    store: dist.Store, rank: int, device: torch.device, timeout: datetime.timedelta, bind_host: str
):
    if link_backend(device) == "nccl":
        if not dist.is_nccl_available():
            raise LinkError("device is CUDA but this torch build has no NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        with _NCCL_ENV_LOCK:  # the setting is read from the environment by the constructor
            before = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = _NCCL_CLEAN_UP_ONLY
            try:
                return dist.ProcessGroupNCCL(store, rank, 2, opts)
            finally:
                if before is None:
                    os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING")
                else:
                    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = before
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
    *,
    secret: str,
) -> P2PLink:
    """The peer's side: connect to the offering process's store and join its link (blocking)."""
    store = connect_store(store_host, store_port, timeout_s)
    bind_host = local_address_towards(store_host, store_port)
    return P2PLink(link_id, store, rank, device, timeout_s, bind_host, secret=secret)


def link_store_prefix(link_id: str) -> str:
    """The store prefix under which a link's keys live."""
    return f"splitvl/link/{link_id}"


def transfer_tag(ticket: int) -> int:
    """Tag for a ticket's send/recv (gloo matches on it; NCCL relies on order)."""
    return ticket % (2**31 - 1)


class P2PLink:
    """A two-rank process group between an encode process (rank 0) and a language process (rank 1).

    Construction blocks until the peer joins (run it off the event loop): rank 0 waits for the
    peer's claim in the store and refuses one made without the secret (LinkRefusedError), then
    both form the group and prove the secret to each other over it. send/recv hold a per-link
    lock, so the transfers of concurrent requests never interleave; the first failure marks the
    link broken, closes it and raises LinkError, and every later call fails fast.
    """

    def __init__(
        self,
        link_id: str,
        store: dist.Store,
        rank: int,
        device: torch.device | str,
        timeout_s: float,
        bind_host: str = "127.0.0.1",
        *,
        secret: str,
    ):
        if rank not in (0, 1):
            raise ValueError(f"a link has ranks 0 and 1, got {rank}")
        if not secret:
            raise LinkRefusedError(f"link {link_id}: no secret; take it from the link's offer")
        self.link_id = link_id
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device(device)
        self.backend = link_backend(self.device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._group = None
        prefixed = dist.PrefixStore(link_store_prefix(link_id), store)
        try:
            self._claim(prefixed, secret)
            group_store = dist.PrefixStore("group", prefixed)
            self._group = _new_group(group_store, rank, self.device, self.timeout, bind_host)
            self._confirm(secret)
        except LinkError as exc:
            self.close(str(exc))
            raise
        except Exception as exc:
            self.close(f"rendezvous failed: {exc}")
            raise LinkError(
                f"link {link_id}: rendezvous with rank {self.peer} failed: {exc}"
            ) from exc
        log.info("link %s up: rank %d, %s on %s", link_id, rank, self.backend, self.device)

    def _claim(self, store: dist.Store, secret: str) -> None:
        """Rank 1 claims the link with its proof; rank 0 accepts only the right one."""
        if self.rank == 1:
            proof = join_proof(secret, self.link_id)
            held = store.compare_set("claim", "", proof).decode("ascii", "replace")
            if held != proof:
                raise LinkRefusedError(
                    f"link {self.link_id} was already claimed by another peer; open a new link"
                )
            store.wait(["verdict"], self.timeout)
            if store.get("verdict") != b"accepted":
                raise LinkRefusedError(f"link {self.link_id}: the offering side refused the claim")
            return
        store.wait(["claim"], self.timeout)
        if not _proof_is_valid(secret, self.link_id, store.get("claim")):
            store.set("verdict", "refused")
            raise LinkRefusedError(
                f"link {self.link_id}: a peer claimed it without the link's secret; refused"
            )
        store.set("verdict", "accepted")

    def _confirm(self, secret: str) -> None:
        """Both ranks prove the secret over the group, each on a nonce of the other's."""
        if self.rank == 0:
            nonce0 = secrets.token_bytes(_NONCE_BYTES)
            self._raw_send(nonce0)
            reply = self._raw_recv(_NONCE_BYTES + _DIGEST_BYTES)
            nonce1, mac1 = reply[:_NONCE_BYTES], reply[_NONCE_BYTES:]
            if not hmac.compare_digest(mac1, _mac(secret, b"rank1", nonce0, nonce1)):
                raise LinkRefusedError(
                    f"link {self.link_id}: the process that joined does not hold the secret"
                )
            self._raw_send(_mac(secret, b"rank0", nonce1))
            return
        nonce0 = self._raw_recv(_NONCE_BYTES)
        nonce1 = secrets.token_bytes(_NONCE_BYTES)
        self._raw_send(nonce1 + _mac(secret, b"rank1", nonce0, nonce1))
        if not hmac.compare_digest(self._raw_recv(_DIGEST_BYTES), _mac(secret, b"rank0", nonce1)):
            raise LinkRefusedError(
                f"link {self.link_id}: the offering process does not hold the secret"
            )

    def _raw_send(self, data: bytes) -> None:
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        complete(self._group.send([tensor], self.peer, _HANDSHAKE_TAG), self.timeout)

    def _raw_recv(self, num_bytes: int) -> bytes:
        tensor = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        complete(self._group.recv([tensor], self.peer, _HANDSHAKE_TAG), self.timeout)
        return bytes(tensor.cpu().numpy())

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def send(
        self, tensors: Sequence[torch.Tensor], tags: Sequence[int], timeout_s: float | None = None
    ) -> int:
        """Send each tensor's bytes, in order; returns the byte count. Blocks until done, or
        until timeout_s (default: the link's timeout) per tensor."""
        timeout = self._timeout(timeout_s)
        with self._lock:
            self._check()
            total = 0
            try:
                for tensor, tag in zip(tensors, tags, strict=True):
                    data = self._as_bytes(tensor)
                    complete(self._group.send([data], self.peer, tag), timeout)
                    total += data.numel()
            except Exception as exc:
                raise self._fail("send", exc) from exc
            return total

    def recv(
        self,
        specs: Sequence[tuple[Sequence[int], torch.dtype]],
        tags: Sequence[int],
        timeout_s: float | None = None,
    ) -> list[torch.Tensor]:
        """Receive one tensor per (shape, dtype) spec, in order, on this link's device."""
        timeout = self._timeout(timeout_s)
        with self._lock:
            self._check()
            out = []
            try:
                for (shape, dtype), tag in zip(specs, tags, strict=True):
                    tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
                    complete(self._group.recv([self._as_bytes(tensor)], self.peer, tag), timeout)
                    out.append(tensor)
            except Exception as exc:
                raise self._fail("recv", exc) from exc
            return out

    def close(self, reason: str = "closed", abort: bool = False) -> None:
        """Release the process group; idempotent. `abort` after a failure: operations may still
        be queued (NCCL), and a clean shutdown would wait for them."""
        if self._broken is None:
            self._broken = reason
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            try:
                if abort and hasattr(group, "abort"):
                    group.abort()
                else:
                    group.shutdown()
            except Exception:  # a broken group may refuse a clean shutdown; it is dropped anyway
                log.debug("link %s: shutdown raised", self.link_id, exc_info=True)

    def _timeout(self, timeout_s: float | None) -> datetime.timedelta:
        if timeout_s is None:
            return self.timeout
        return min(self.timeout, datetime.timedelta(seconds=max(timeout_s, 0.001)))

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
        self.close(reason, abort=True)
        return LinkError(f"link {self.link_id} broke during {op} with rank {self.peer}: {exc}")
