"""Fail-over of the encode client under faults, with real encode processes: a replica killed and
restarted, a replica that stalls, a link broken mid-transfer, every replica down.

Each test streams requests through an EncodeClient while the fault happens and checks that no
request fails, how long requests took, and when the faulty replica got traffic again.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import dataclass, field

import pytest

from services.language.encoder.client import EncodeClient, EncodeClientConfig, EncodeError
from services.language.encoder.rpc import ErrorKind
from shared.wire.images import ImageRef
from shared.wire.link import P2PLink
from tests.encode.helpers import EncodeProcess, png_bytes

pytestmark = pytest.mark.slow


@dataclass
class Record:
    start: float
    end: float
    source: str | None
    error: str | None = None


@dataclass
class Load:
    """`concurrency` workers sending one-image requests back to back, each result recorded."""

    client: EncodeClient
    concurrency: int = 3
    seed: int = 0
    records: list[Record] = field(default_factory=list)

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._worker(k)) for k in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 60)

    async def _worker(self, k: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            data = png_bytes(48, 48, seed=self.seed + 1000 * k + n)  # unique: no cache hits
            start = time.monotonic()
            try:
                [image] = await self.client.encode([ImageRef(data)])
                self.records.append(Record(start, time.monotonic(), image.source))
            except EncodeError as exc:
                self.records.append(Record(start, time.monotonic(), None, str(exc)))

    def errors(self) -> list[str]:
        return [r.error for r in self.records if r.error is not None]

    def p99_latency(self, since: float) -> float:
        latencies = sorted(r.end - r.start for r in self.records if r.start >= since)
        assert latencies, "no request was sent in the interval"
        return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]

    def first_served_by(self, address: str, since: float) -> float | None:
        """When the first request started after `since` was answered by `address`."""
        ends = [r.end for r in self.records if r.source == address and r.start >= since]
        return min(ends) if ends else None


def _report(test: str, **numbers) -> None:
    """One line of measured numbers (shown with pytest -rP)."""
    print(
        test,
        " ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
        ),
    )


async def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s")
        await asyncio.sleep(0.02)


class Replicas:
    """Two encode replicas, a and b; a killed one is started again on its port."""

    def __init__(self, model_dir, workdir):
        self.model_dir = model_dir
        self.workdir = workdir
        self.started = 0
        self.procs = {name: self._new(name) for name in ("a", "b")}
        for proc in self.procs.values():
            proc.wait_serving()
        self.addresses = {name: proc.address for name, proc in self.procs.items()}

    def _new(self, name: str, port: int = 0) -> EncodeProcess:
        self.started += 1
        args = ("--link-timeout", "10", "--port", str(port))
        return EncodeProcess(
            self.model_dir, self.workdir, *args, name=f"{name}{self.started}"
        ).start()

    def restart(self, name: str) -> float:
        """Start `name` again on the same port; returns when it reported SERVING."""
        port = int(self.addresses[name].rsplit(":", 1)[1])
        self.procs[name].kill()
        self.procs[name] = self._new(name, port).wait_serving()
        assert self.procs[name].address == self.addresses[name]
        return time.monotonic()

    def ensure_up(self) -> None:
        for name, proc in self.procs.items():
            if proc.proc.poll() is not None:
                self.restart(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def replicas(tiny_vl_dir, tmp_path_factory):
    pair = Replicas(tiny_vl_dir, tmp_path_factory.mktemp("faults"))
    try:
        yield pair
    finally:
        pair.stop()


def _config(replicas: Replicas, **kw) -> EncodeClientConfig:
    endpoints = (replicas.addresses["a"], replicas.addresses["b"])
    defaults = {"timeout_s": 30.0, "cooldown_s": 1.0, "probe_interval_s": 0.25}
    return EncodeClientConfig(endpoints, **{**defaults, **kw})


def test_a_stalled_replica_is_timed_out_avoided_and_taken_back(replicas):
    replicas.ensure_up()
    a, b = replicas.addresses["a"], replicas.addresses["b"]
    attempt_timeout = 1.0

    async def run():
        client = EncodeClient(
            _config(replicas, attempt_timeout_s=attempt_timeout, probe_timeout_s=0.5)
        )
        load = Load(client, concurrency=3, seed=10_000)
        try:
            load.start()
            await _wait_for(
                lambda: load.first_served_by(a, 0) and load.first_served_by(b, 0),
                10,
                "traffic on both replicas",
            )
            replicas.procs["a"].signal(signal.SIGSTOP)  # keeps its port, answers nothing
            stopped = time.monotonic()
            # The calls stuck on a time out after attempt_timeout and a leaves the rotation.
            await _wait_for(lambda: not client.replica_stats()[a].admitted, 5, "a out")
            out_at = time.monotonic()
            attempts_out = client.replica_stats()[a].attempts
            await asyncio.sleep(3.0)  # past the cool-down: probes time out, a stays out
            attempts_later = client.replica_stats()[a].attempts
            replicas.procs["a"].signal(signal.SIGCONT)
            resumed = time.monotonic()
            await _wait_for(lambda: load.first_served_by(a, resumed), 10, "traffic on a again")
            await load.stop()
            return load, client.retries, stopped, out_at, attempts_out, attempts_later, resumed
        finally:
            await client.close()

    try:
        load, retries, stopped, out_at, attempts_out, attempts_later, resumed = asyncio.run(run())
    finally:
        replicas.procs["a"].signal(signal.SIGCONT)
    during = [r for r in load.records if stopped <= r.start < resumed]
    _report(
        "stall",
        requests=len(load.records),
        failed=len(load.errors()),
        retries=retries,
        out_after_s=out_at - stopped,
        max_latency_during_s=max(r.end - r.start for r in during),
        calls_to_stalled_while_out=attempts_later - attempts_out,
        back_after_s=load.first_served_by(a, resumed) - resumed,
    )
    assert load.errors() == []
    assert retries >= 1  # the images stuck on a were encoded by b
    assert out_at - stopped < attempt_timeout + 1.0
    assert attempts_later == attempts_out, "the stalled replica got calls while out of rotation"
    assert during and max(r.end - r.start for r in during) < attempt_timeout + 1.5
    assert {r.source for r in during if r.start > out_at} == {b}
    assert load.first_served_by(a, resumed) - resumed < 3.0


def test_a_replica_that_accepts_connections_but_never_answers_costs_a_second(replicas):
    """A listener that never speaks HTTP/2 (a hung process, a half-dead host) is what left calls
    waiting for gRPC's 20 s connect timeout; the client's channels give up after 1 s."""
    replicas.ensure_up()
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # the kernel completes TCP handshakes; nobody ever reads
        silent = f"127.0.0.1:{hole.getsockname()[1]}"

        async def run():
            config = EncodeClientConfig((silent, replicas.addresses["b"]), timeout_s=30.0)
            client = EncodeClient(config)
            load = Load(client, concurrency=2, seed=50_000)
            try:
                load.start()
                await asyncio.sleep(2.0)
                await load.stop()
                return load, client.replica_stats()[silent]
            finally:
                await client.close()

        load, stats = asyncio.run(run())
    worst = max(r.end - r.start for r in load.records)
    _report(
        "silent",
        requests=len(load.records),
        failed=len(load.errors()),
        worst_s=worst,
        attempts_on_silent=stats.attempts,
    )
    assert load.errors() == [] and len(load.records) > 10
    assert worst < 2.0 and not stats.admitted
    assert stats.attempts <= 2  # then it stays out of rotation


def _check_taken_back(load: Load, address: str, serving_at: float, within_s: float) -> None:
    first = load.first_served_by(address, serving_at)
    assert first is not None and first - serving_at < within_s, (
        f"the restarted replica got no traffic within {within_s} s of SERVING"
    )


POLL_MARGIN_S = 0.3


def test_a_killed_replica_costs_no_request_and_gets_traffic_once_restarted(replicas):
    replicas.ensure_up()
    a, b = replicas.addresses["a"], replicas.addresses["b"]

    async def run():
        # The same streams, one client that takes replicas back after 1 s of cool-down and one
        # that never does within the test: its check below must fail.
        back = EncodeClient(_config(replicas))
        never = EncodeClient(_config(replicas, cooldown_s=3600.0))
        loads = [Load(back, seed=20_000), Load(never, seed=30_000)]
        try:
            for load in loads:
                load.start()
            await _wait_for(lambda: all(x.first_served_by(a, 0) for x in loads), 10, "warm")
            replicas.procs["a"].kill()
            killed = time.monotonic()
            serving = await asyncio.to_thread(replicas.restart, "a")
            await _wait_for(lambda: loads[0].first_served_by(a, serving), 5, "traffic on a")
            await asyncio.sleep(1.0)
            for load in loads:
                await load.stop()
            # Then every replica goes down: requests fail at once, as UNAVAILABLE.
            for proc in replicas.procs.values():
                proc.kill()
            start = time.monotonic()
            with pytest.raises(EncodeError) as err:
                await back.encode([ImageRef(png_bytes(32, 32, seed=1))])
            return loads, killed, serving, err.value, time.monotonic() - start
        finally:
            await back.close()
            await never.close()

    loads, killed, serving, all_down, all_down_s = asyncio.run(run())
    for name, load in zip(("readmitting", "never"), loads, strict=True):
        back = load.first_served_by(a, serving)
        _report(
            f"kill/{name}",
            requests=len(load.records),
            failed=len(load.errors()),
            p99_after_kill_s=load.p99_latency(since=killed),
            restart_s=serving - killed,
            back_after_serving_s=-1.0 if back is None else back - serving,
            all_down_s=all_down_s,
        )
    for load in loads:
        assert load.errors() == []
        assert load.p99_latency(since=killed) < 2.0
        # `serving` is when the test's health poll saw the new process (polled every 0.1 s, a
        # new channel each time): a client may reach it a little before that.
        before = serving - POLL_MARGIN_S
        assert {r.source for r in load.records if killed + 0.5 < r.start < before} == {b}
    _check_taken_back(loads[0], a, serving, within_s=3.0)
    with pytest.raises(AssertionError, match="no traffic"):
        _check_taken_back(loads[1], a, serving, within_s=3.0)
    assert all_down.kind is ErrorKind.UNAVAILABLE and all_down_s < 1.0


def test_a_link_broken_mid_transfer_is_retried_and_nothing_hangs(replicas, monkeypatch):
    replicas.ensure_up()
    images = [ImageRef(png_bytes(64, 64, seed=40_000 + i)) for i in range(4)]
    original_recv = P2PLink.recv
    killed: list[str] = []

    async def run():
        client = EncodeClient(_config(replicas, transport="nccl", attempt_timeout_s=5.0))
        try:
            for _ in range(5):  # a link to each replica (a just restarted one may be cooling)
                warm = await client.encode(images)
                if {w.source for w in warm} == set(replicas.addresses.values()):
                    break
                await asyncio.sleep(0.5)
            links = {name: client.link_id(addr) for name, addr in replicas.addresses.items()}
            assert all(links.values())
            owners = {link_id: name for name, link_id in links.items()}

            def recv_with_fault(link, *args, **kw):
                # The replica has posted its send (Transfer said ready); it dies before this
                # side has read the bytes.
                if not killed:
                    killed.append(replicas.addresses[owners[link.link_id]])
                    replicas.procs[owners[link.link_id]].kill()
                return original_recv(link, *args, **kw)

            monkeypatch.setattr(P2PLink, "recv", recv_with_fault)
            start = time.monotonic()
            [image] = await asyncio.wait_for(client.encode([ImageRef(png_bytes(80, 80, 1))]), 20)
            elapsed = time.monotonic() - start
            return image, elapsed, client.retries, client.replica_stats()
        finally:
            await client.close()

    image, elapsed, retries, stats = asyncio.run(run())
    assert killed and image.source != killed[0]  # retried on the other replica
    assert retries == 1 and stats[killed[0]].failures == 1 and not stats[killed[0]].admitted
    assert elapsed < 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["grpc", "nccl"])
def test_no_replica_up_is_unavailable_at_once(transport):
    endpoints = tuple(f"127.0.0.1:{_free_port()}" for _ in range(2))

    async def run():
        client = EncodeClient(EncodeClientConfig(endpoints, transport, timeout_s=30.0))
        try:
            start = time.monotonic()
            with pytest.raises(EncodeError) as err:
                await client.encode([ImageRef(png_bytes(32, 32, seed=2))])
            return err.value, time.monotonic() - start
        finally:
            await client.close()

    error, elapsed = asyncio.run(run())
    assert error.kind is ErrorKind.UNAVAILABLE and elapsed < 1.0
