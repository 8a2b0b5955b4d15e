"""Encoder cache affinity: an image goes to the encode replica its content hashes to, from any
language replica; adding or removing a replica moves only its share; an overloaded replica
spills to the least loaded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.language.encoder.client import EncodeClient, EncodeClientConfig
from services.language.encoder.placement import affinity_key, choose
from shared.wire.images import ImageRef
from tests.encode.helpers import EncodeProcess, png_bytes


@dataclass
class _Replica:
    address: str
    outstanding: int = 0
    last_pick: int = 0


def _owners(keys, addresses) -> dict[bytes, str]:
    replicas = [_Replica(a) for a in addresses]
    return {key: choose(key, replicas).address for key in keys}


KEYS = [affinity_key(ImageRef(data=i.to_bytes(4, "big"))) for i in range(2000)]


def test_the_key_is_the_content_and_the_resize_bounds():
    data = b"\x89PNG image bytes"
    assert affinity_key(ImageRef(data=data)) == affinity_key(ImageRef(data=bytes(data)))
    assert affinity_key(ImageRef(data=data)) != affinity_key(ImageRef(data=data, max_pixels=4096))
    assert affinity_key(ImageRef(content_hash="ab" * 32)) == affinity_key(
        ImageRef(content_hash="ab" * 32)
    )


def test_every_language_replica_picks_the_same_encode_replica_and_the_load_spreads():
    addresses = ["encode-0:50051", "encode-1:50051", "encode-2:50051"]
    first, second = _owners(KEYS, addresses), _owners(KEYS, list(reversed(addresses)))
    assert first == second  # the order a replica list is given in does not matter
    shares = [sum(owner == a for owner in first.values()) / len(KEYS) for a in addresses]
    assert all(0.28 < share < 0.39 for share in shares), shares


def test_removing_or_adding_a_replica_moves_only_its_share():
    three = _owners(KEYS, ["a:1", "b:1", "c:1"])
    two = _owners(KEYS, ["a:1", "b:1"])
    moved = [k for k in KEYS if three[k] != two[k]]
    assert all(three[k] == "c:1" for k in moved)  # only c's images moved
    four = _owners(KEYS, ["a:1", "b:1", "c:1", "d:1"])
    moved = [k for k in KEYS if three[k] != four[k]]
    assert all(four[k] == "d:1" for k in moved)
    assert 0.18 < len(moved) / len(KEYS) < 0.32  # about a quarter go to the new one


def test_an_overloaded_first_choice_spills_to_the_least_loaded():
    key = KEYS[0]
    replicas = [_Replica("a:1"), _Replica("b:1"), _Replica("c:1")]
    first = choose(key, replicas)
    first.outstanding = 2  # mean with this call (3 in flight over 3) is 1; bound ceil(1.25) = 2
    spilled = choose(key, replicas)
    assert spilled is not first and spilled.outstanding == 0
    for replica in replicas:
        replica.outstanding = 1  # even load: the first choice is within its share and stays
    assert choose(key, replicas) is first
    replicas[0].outstanding = 0
    assert choose(None, replicas) is replicas[0]  # no key: the least loaded


def test_repeats_from_two_language_replicas_hit_one_encoder_cache(tiny_vl_dir, tmp_path):
    replicas = [EncodeProcess(tiny_vl_dir, tmp_path, name=f"r{i}").start() for i in range(2)]
    images = [ImageRef(png_bytes(64 + 8 * i, 64, seed=300 + i)) for i in range(8)]

    async def through(client_config):
        client = EncodeClient(client_config)
        try:
            # One image at a time: the load bound never spills, affinity alone decides
            return [(await client.encode([image]))[0] for image in images]
        finally:
            await client.close()

    try:
        for replica in replicas:
            replica.wait_serving()
        config = EncodeClientConfig(tuple(r.address for r in replicas))
        first = asyncio.run(through(config))  # "language replica 0"
        second = asyncio.run(through(config))  # "language replica 1": a client of its own
    finally:
        for replica in replicas:
            replica.stop()
    assert [a.source for a in first] == [b.source for b in second]
    assert {a.source for a in first} == {r.address for r in replicas}  # both replicas used
    assert not any(a.cache_hit for a in first)
    assert all(b.cache_hit for b in second)  # every repeat hit, whichever client sent it
