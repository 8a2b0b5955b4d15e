"""CPU placement: services on one host split its cores by role through a registry directory;
dead or reused pids do not count (the engine's use: tests/language/engine/
test_engine_placement.py)."""

from __future__ import annotations

import json
import os

import pytest

from services.common import placement
from services.common.placement import Claim, CorePlacement, live_claims, share, write_claim


@pytest.mark.parametrize(
    "role, live, cores, want",
    [
        ("language", {"language": 1}, 16, 16),  # alone: every core
        ("encode", {"encode": 1}, 8, 8),
        ("encode", {"encode": 2}, 8, 4),  # one role: split evenly
        ("language", {"language": 1, "encode": 1}, 16, 12),  # both: a quarter for encoding
        ("encode", {"language": 1, "encode": 1}, 16, 4),
        ("encode", {"language": 1, "encode": 1}, 2, 1),
        ("language", {"language": 1, "encode": 1}, 2, 1),
        ("encode", {"language": 1, "encode": 3}, 8, 1),  # 3 replicas share 2 cores: 1 each
        ("language", {"language": 2, "encode": 1}, 16, 6),
        ("language", {"language": 1, "encode": 1}, 1, 1),  # never below one
    ],
)
def test_share(role, live, cores, want):
    assert share(role, live, cores) == want


def test_shares_never_oversubscribe_when_there_are_cores_enough():
    for cores in range(2, 65):
        for encodes in range(1, 4):
            for languages in range(1, 4):
                if encodes + languages > cores:
                    continue
                live = {"encode": encodes, "language": languages}
                used = encodes * share("encode", live, cores)
                used += languages * share("language", live, cores)
                assert used <= cores, (cores, live)


def test_a_later_service_takes_its_share_and_a_dead_ones_share_returns(tmp_path, other_process):
    language = CorePlacement("language", tmp_path, cores=8)
    assert language.threads() == 8
    pid = other_process.pid
    write_claim(tmp_path, Claim(pid, "encode", placement.start_time(pid)))
    language._read_at = -float("inf")  # past the refresh interval
    assert language.threads() == 6
    other_process.kill()
    other_process.wait()
    language._read_at = -float("inf")
    assert language.threads() == 8
    assert not (tmp_path / f"{pid}-encode.json").exists()  # a dead claim is swept
    language.close()
    assert not list(tmp_path.glob("*.json"))


def test_a_reused_pid_is_not_the_process_that_registered(tmp_path, other_process):
    pid = other_process.pid
    write_claim(tmp_path, Claim(pid, "encode", placement.start_time(pid) + 1))
    assert live_claims(tmp_path) == []


def test_unreadable_or_foreign_files_are_ignored(tmp_path):
    (tmp_path / "1-encode.json").write_text("{not json")
    (tmp_path / "2-other.json").write_text(json.dumps({"pid": os.getpid(), "role": "x"}))
    assert live_claims(tmp_path) == []
    with pytest.raises(ValueError, match="role"):
        CorePlacement("router", tmp_path)


def test_explicit_counts_and_the_switch_opt_out(monkeypatch, tmp_path):
    monkeypatch.setenv(placement.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(placement.OFF_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert placement.for_service("language", "cuda:0") is None
    assert placement.for_service("language", "cpu", threads=2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert placement.for_service("encode", "cpu") is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(placement.OFF_ENV, "off")
    assert placement.for_service("encode", "cpu") is None
    monkeypatch.delenv(placement.OFF_ENV)
    got = placement.for_service("encode", "cpu")
    assert got is not None and (tmp_path / f"{os.getpid()}-encode.json").is_file()
    got.close()
