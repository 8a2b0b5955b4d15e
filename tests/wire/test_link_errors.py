"""A link whose peer stalls or dies costs one call its timeout: the operation raises LinkError,
the link is marked broken and its group aborted, and the process goes on (gloo here; the same
code path runs NCCL, whose `wait` returns before the work is done)."""

from __future__ import annotations

import datetime
import threading
import time
import uuid

import pytest
import torch

from shared.wire.errors import LinkError
from shared.wire.link import complete, new_link_secret, start_store_server
from tests.wire.test_link_security import TIMEOUT_S, _join, _offer


class _NcclLikeWork:
    """NCCL's semantics: `wait` only queues a stream wait; completion comes later, or never."""

    def __init__(self, done_after: int | None) -> None:
        self.polls = 0
        self.done_after = done_after

    def wait(self, timeout) -> bool:
        return True

    def is_completed(self) -> bool:
        self.polls += 1
        return self.done_after is not None and self.polls > self.done_after


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_work_that_never_completes_times_out_at_its_deadline():
    clock = _Clock()
    with pytest.raises(TimeoutError, match="no completion within 2.0 s"):
        complete(_NcclLikeWork(None), datetime.timedelta(seconds=2), clock, clock.sleep)
    assert 2.0 <= clock.now < 2.01


def test_work_that_completes_late_but_in_time_is_waited_for():
    clock = _Clock()
    work = _NcclLikeWork(done_after=50)
    complete(work, datetime.timedelta(seconds=2), clock, clock.sleep)
    assert work.polls == 51 and clock.now < 2.0


@pytest.fixture
def link_pair():
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    offering = _offer(store, link_id, secret)
    joined = _join(store, link_id, secret)
    offering.join()
    assert offering.error is None
    links = (offering.result, joined)
    yield links
    for link in links:
        link.close()


def test_a_peer_that_never_sends_costs_the_receive_its_timeout(link_pair):
    offering, joined = link_pair
    start = time.monotonic()
    with pytest.raises(LinkError, match="broke during recv"):
        joined.recv([((16,), torch.float32)], [7], timeout_s=0.5)
    assert time.monotonic() - start < 0.5 + 2.0
    assert joined.broken
    with pytest.raises(LinkError, match="unusable"):  # every later call fails fast
        joined.recv([((16,), torch.float32)], [8], timeout_s=5)
    assert not offering.broken  # the other side learns on its own next operation


def test_aborting_a_failed_group_leaves_the_process_serving(link_pair):
    offering, joined = link_pair
    with pytest.raises(LinkError):
        offering.recv([((4,), torch.float32)], [3], timeout_s=0.2)
    assert offering.broken
    # A new link between the same processes works: nothing process-wide was torn down
    store = start_store_server("127.0.0.1", TIMEOUT_S)
    link_id, secret = uuid.uuid4().hex, new_link_secret()
    fresh_offer = _offer(store, link_id, secret)
    fresh = _join(store, link_id, secret)
    fresh_offer.join()
    sender = fresh_offer.result
    try:
        got = []
        thread = threading.Thread(
            target=lambda: got.append(fresh.recv([((4,), torch.float32)], [9])), daemon=True
        )
        thread.start()
        sender.send([torch.arange(4.0)], [9])
        thread.join(TIMEOUT_S)
        assert torch.equal(got[0][0], torch.arange(4.0))
    finally:
        sender.close()
        fresh.close()


def test_a_replica_on_this_processs_own_gpu_is_refused_the_link_naming_what_works():
    from shared.wire.errors import IncompatibleEncoderError
    from shared.wire.info import EncoderContract, EncoderInfo, check_link_placement

    contract = EncoderContract("ckpt", 64, 2, "bfloat16", 16, 2, 2)

    def info(uuid: str) -> EncoderInfo:
        return EncoderInfo("m", contract, 1, 2, 3, 4, 5, "cuda:0", "nccl", device_uuid=uuid)

    with pytest.raises(IncompatibleEncoderError, match="same GPU .*--transport grpc"):
        check_link_placement("GPU-1234", info("GPU-1234"), "10.0.0.2:50051")
    check_link_placement("GPU-1234", info("GPU-5678"), "10.0.0.2:50051")  # another GPU: fine
    check_link_placement("", info(""), "127.0.0.1:50051")  # CPUs: gloo links any two processes
