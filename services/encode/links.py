"""The encode side of torch.distributed links: rendezvous store, open links and pending tickets.

An Encode call with the link transport leaves each image's tensor here under a ticket; the client
redeems tickets with Transfer on a link it opened with OpenLink. Tickets outlive links, so a request
whose link broke can fetch its tensors over a new link; unredeemed tickets expire after a TTL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shared.wire.errors import LinkRefusedError
from shared.wire.link import (
    LinkError,
    LinkOffer,
    P2PLink,
    link_backend,
    new_link_secret,
    start_store_server,
    transfer_tag,
)

log = logging.getLogger(__name__)


class TicketError(LookupError):
    """A ticket is unknown: never issued, already redeemed or expired."""


class UnknownLinkError(LookupError):
    """No open link has this id (closed, broken, never opened, or the service restarted)."""


class LinkLimitError(RuntimeError):
    """As many links are open or waiting for their peer as the service allows."""


@dataclass
class _Ticket:
    tensor: torch.Tensor
    issued_at: float


class LinkManager:
    """Links of one encode process (rank 0 of each) and the tensors waiting on tickets."""

    def __init__(
        self,
        host: str,
        device: torch.device | str,
        timeout_s: float,
        ticket_ttl_s: float,
        max_workers: int = 16,
        max_links: int = 64,
    ):
        self.host = host
        self.device = torch.device(device)
        self.backend = link_backend(self.device)
        self.timeout_s = timeout_s
        self.ticket_ttl_s = ticket_ttl_s
        self.max_links = max_links
        self._store = None
        self._links: dict[str, Future] = {}
        self._tickets: OrderedDict[int, _Ticket] = OrderedDict()
        self._next_ticket = itertools.count(1)
        # Sends block on the peer, so they run on threads of their own.
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="link")

    @property
    def num_links(self) -> int:
        self._prune()
        return len(self._links)

    def is_open(self, link_id: str) -> bool:
        return link_id in self._links

    @property
    def pending_tickets(self) -> int:
        self.expire()
        return len(self._tickets)

    def open(self, peer_device: str) -> LinkOffer:
        """Start a link (rank 0 joins on a worker thread) and return how the peer joins it.

        The offer's secret goes only to the caller; rank 0 refuses a peer that cannot prove it.
        """
        if self.num_links >= self.max_links:
            raise LinkLimitError(
                f"{self.max_links} links are open or waiting for their peer; close unused links "
                "or start the encode service with a larger --max-links"
            )
        if self._store is None:
            self._store = start_store_server(self.host, self.timeout_s)
            log.info("link store listening on %s:%d", self.host, self._store.port)
        link_id = uuid.uuid4().hex
        secret = new_link_secret()
        pending: Future = Future()
        args = (link_id, self._store, 0, self.device, self.timeout_s, self.host)
        # A daemon thread, not the pool: a peer that never joins must not hold up process exit.
        threading.Thread(
            target=_construct,
            args=(pending, args, secret),
            name=f"link-{link_id[:8]}",
            daemon=True,
        ).start()
        self._links[link_id] = pending
        log.info("link %s opening for a peer on %s (%s)", link_id, peer_device or "?", self.backend)
        return LinkOffer(
            link_id, self.host, self._store.port, self.backend, 1, self.timeout_s, secret
        )

    def _prune(self) -> None:
        """Forget links whose set-up failed (peer never came, or was refused)."""
        for link_id, pending in list(self._links.items()):
            if pending.done() and pending.exception() is not None:
                del self._links[link_id]

    def issue(self, tensor: torch.Tensor) -> int:
        """Hold a tensor for a later Transfer; returns its ticket."""
        self.expire()
        ticket = next(self._next_ticket)
        self._tickets[ticket] = _Ticket(tensor, time.monotonic())
        return ticket

    def take(self, tickets: list[int]) -> list[torch.Tensor]:
        """Remove and return the tensors of tickets (all or none)."""
        self.expire()
        missing = [t for t in tickets if t not in self._tickets]
        if missing:
            raise TicketError(
                f"unknown ticket(s) {missing}: already redeemed or expired after "
                f"{self.ticket_ttl_s:.0f}s; encode the image again"
            )
        return [self._tickets.pop(t).tensor for t in tickets]

    def expire(self) -> None:
        cutoff = time.monotonic() - self.ticket_ttl_s
        while self._tickets:
            ticket, entry = next(iter(self._tickets.items()))
            if entry.issued_at > cutoff:
                break
            del self._tickets[ticket]
            log.warning("ticket %d expired unredeemed", ticket)

    async def send(self, link_id: str, tickets: list[int], tensors: list[torch.Tensor]) -> int:
        """Send tensors over a link in order; a failure closes the link and raises LinkError."""
        link = await self._ready_link(link_id)
        loop = asyncio.get_running_loop()
        tags = [transfer_tag(t) for t in tickets]
        try:
            return await loop.run_in_executor(self._executor, link.send, tensors, tags)
        except LinkError:
            self._links.pop(link_id, None)
            raise

    async def _ready_link(self, link_id: str) -> P2PLink:
        pending = self._links.get(link_id)
        if pending is None:
            raise UnknownLinkError(f"no open link {link_id}; call OpenLink again")
        try:
            link = await asyncio.wait_for(asyncio.wrap_future(pending), self.timeout_s)
        except Exception as exc:
            self._links.pop(link_id, None)
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"link {link_id} was not set up: {exc!r}") from exc
        if link.broken:
            self._links.pop(link_id, None)
            raise LinkError(f"link {link_id} is broken; open a new one")
        return link

    def close(self, link_id: str) -> bool:
        """Close one link; False when it was not open."""
        pending = self._links.pop(link_id, None)
        if pending is None:
            return False
        pending.add_done_callback(_close_when_ready)
        log.info("link %s closed", link_id)
        return True

    def close_all(self) -> None:
        for link_id in list(self._links):
            self.close(link_id)
        self._tickets.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _construct(pending: Future, args: tuple, secret: str) -> None:
    try:
        pending.set_result(P2PLink(*args, secret=secret))
    except LinkRefusedError as exc:
        log.warning("%s", exc)
        pending.set_exception(exc)
    except BaseException as exc:  # delivered to whoever awaits the link
        pending.set_exception(exc)


def _close_when_ready(pending: Future) -> None:
    if pending.cancelled() or pending.exception() is not None:
        return
    pending.result().close("closed by the encode service")
