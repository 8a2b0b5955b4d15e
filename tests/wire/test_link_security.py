"""Who can join a link: the store listens on its host only, a peer must prove the link's secret,
a link is claimed once, and both ranks check the secret over the formed group."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import torch
import torch.distributed as dist

from shared.wire.errors import LinkError, LinkRefusedError
from shared.wire.link import (
    P2PLink,
    connect_store,
    join_proof,
    link_store_prefix,
    new_link_secret,
    start_store_server,
)

TIMEOUT_S = 5.0


class _Background:
    """Build one rank of a link on a thread (the other rank blocks the test's thread)."""

    def __init__(self, build):
        self.result = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(build,), daemon=True)
        self._thread.start()

    def _run(self, build) -> None:
        try:
            self.result = build()
        except Exception as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(3 * TIMEOUT_S)
        assert not self._thread.is_alive(), "link set-up hung"


def _offer(store, link_id: str, secret: str) -> _Background:
    return _Background(lambda: P2PLink(link_id, store, 0, "cpu", TIMEOUT_S, secret=secret))


def _join(store, link_id: str, secret: str, cls=P2PLink) -> P2PLink:
    client = connect_store("127.0.0.1", store.port, TIMEOUT_S)
    return cls(link_id, client, 1, "cpu", TIMEOUT_S, secret=secret)


def _moves_a_tensor(sender: P2PLink, receiver: P2PLink) -> bool:
    x = torch.arange(8.0)
    got = _Background(lambda: receiver.recv([((8,), torch.float32)], [5]))
    sender.send([x], [5])
    got.join()
    return got.error is None and torch.equal(got.result[0], x)


def test_the_store_listens_only_on_its_host():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    with socket.create_connection(("127.0.0.1", store.port), timeout=2):
        pass
    # Every 127/8 address reaches this host; a wildcard listener would accept on 127.0.0.2.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", store.port), timeout=2).close()


def test_a_peer_without_the_secret_is_refused_and_the_next_link_works():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    start = time.monotonic()
    with pytest.raises(LinkRefusedError, match="refused"):
        _join(store, link_id, "not the secret")
    offering.join()
    assert isinstance(offering.error, LinkRefusedError)
    assert "without the link's secret" in str(offering.error)
    assert time.monotonic() - start < TIMEOUT_S  # refused at once, not on a timeout
    # The legitimate peer opens a new link (a new id and secret) and it carries data.
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    peer = _join(store, link_id, secret)
    offering.join()
    assert _moves_a_tensor(offering.result, peer)
    for link in (offering.result, peer):
        link.close()


def test_a_link_is_claimed_once_and_a_late_rogue_leaves_it_working():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    peer = _join(store, link_id, secret)
    offering.join()
    with pytest.raises(LinkRefusedError, match="already claimed"):
        _join(store, link_id, "guess")
    with pytest.raises(LinkRefusedError, match="already claimed"):
        _join(store, link_id, secret)  # even with the secret: one peer per link
    assert _moves_a_tensor(offering.result, peer)
    assert _moves_a_tensor(peer, offering.result)
    for link in (offering.result, peer):
        link.close()


class _RacingRogue(P2PLink):
    """A process that skips the claim and joins the group directly, as one that raced the
    rendezvous keys in the store would."""

    def _claim(self, store, secret):
        pass


def test_a_process_that_raced_into_the_group_fails_the_secret_check():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    client = connect_store("127.0.0.1", store.port, TIMEOUT_S)
    # The claim passes (as if the legitimate peer had made it), then a rogue forms the group.
    dist.PrefixStore(link_store_prefix(link_id), client).set("claim", join_proof(secret, link_id))
    with pytest.raises(LinkError):
        _RacingRogue(link_id, client, 1, "cpu", TIMEOUT_S, secret="a guess")
    offering.join()
    assert isinstance(offering.error, LinkRefusedError)
    assert "does not hold the secret" in str(offering.error)


def test_a_closed_peer_fails_a_waiting_receive_at_once():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    peer = _join(store, link_id, secret)
    offering.join()
    waiting = _Background(lambda: peer.recv([((4,), torch.float32)], [3]))
    time.sleep(0.2)
    start = time.monotonic()
    offering.result.close("the encode side went away")
    waiting.join()
    assert isinstance(waiting.error, LinkError) and peer.broken
    assert time.monotonic() - start < TIMEOUT_S / 2
