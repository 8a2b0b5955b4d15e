"""Which encode replica an image goes to: rendezvous hashing of its content, with a load bound.

Every language replica ranks the encode replicas for an image the same way (highest
hash(image key, replica address) first), so the same image lands on the same encode replica
whichever language replica sends it, and its embeddings come from that replica's cache; adding
or removing a replica moves only the images whose first choice it is (1/n of them). A replica
already holding more than its fair share of the calls in flight (`load_factor` times the mean)
is passed over for the least loaded one, so one hot image cannot pile a burst onto one replica.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

from shared.wire.images import ImageRef

LOAD_FACTOR = 1.25  # a replica may hold up to 25% more than the mean before it spills


class Candidate(Protocol):
    address: str
    outstanding: int
    last_pick: int  # when it was last chosen: ties of load go to the one chosen longest ago


def affinity_key(ref: ImageRef) -> bytes:
    """What decides an image's replica: its content and its resize bounds (the encode caches
    key on both). Images sent by hash alone use the hash."""
    digest = hashlib.blake2b(digest_size=16)
    if ref.data is not None:
        digest.update(ref.data)
    else:
        digest.update((ref.content_hash or ref.url or "").encode())
    digest.update(f"|{ref.min_pixels}|{ref.max_pixels}".encode())
    return digest.digest()


def rendezvous_score(key: bytes, address: str) -> int:
    """The replica's rank for a key (higher first): the same on every language replica."""
    return int.from_bytes(hashlib.blake2b(key + address.encode(), digest_size=8).digest(), "big")


def choose(key: bytes | None, candidates: Sequence[Candidate], load_factor: float = LOAD_FACTOR):
    """The candidate for `key`: its rendezvous first choice unless that one is above the load
    bound, then the least loaded; the least loaded when there is no key."""
    least_loaded = min(candidates, key=lambda c: (c.outstanding, c.last_pick))
    if key is None:
        return least_loaded
    first = max(candidates, key=lambda c: rendezvous_score(key, c.address))
    in_flight = sum(c.outstanding for c in candidates) + 1  # this call included
    bound = math.ceil(load_factor * in_flight / len(candidates))
    return first if first.outstanding < bound else least_loaded
