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
        ("language", {"language": 1, "encode": 1}, 16, 16),  # the language keeps every core
        ("encode", {"language": 1, "encode": 1}, 16, 4),  # the encodes get a quarter
        ("encode", {"language": 1, "encode": 2}, 16, 2),
        ("encode", {"language": 1, "encode": 1}, 2, 1),
        ("language", {"language": 1, "encode": 1}, 2, 2),
        ("encode", {"language": 1, "encode": 3}, 8, 1),  # never below one
        ("language", {"language": 2, "encode": 1}, 16, 8),
    ],
)
def test_share(role, live, cores, want):
    assert share(role, live, cores) == want


def test_encoding_beside_a_language_service_takes_at_most_a_quarter_of_the_cores():
    for cores in range(1, 65):
        for encodes in range(1, 4):
            live = {"encode": encodes, "language": 1}
            used = encodes * share("encode", live, cores)
            assert used <= max(encodes, round(cores * 0.25)), (cores, live)
            assert share("language", live, cores) == cores


def test_shares_follow_the_services_that_come_and_go(tmp_path, other_process):
    language = CorePlacement("language", tmp_path, cores=8)
    assert language.threads() == 8
    pid = other_process.pid
    encode = CorePlacement("encode", tmp_path, cores=8)  # this process, in the encode role
    assert encode.threads() == 2  # beside the language service
    write_claim(tmp_path, Claim(pid, "encode", placement.start_time(pid)))
    encode._read_at = -float("inf")  # past the refresh interval
    assert encode.threads() == 1  # two replicas share the quarter
    assert language.threads() == 8  # the language service keeps every core
    other_process.kill()
    other_process.wait()
    encode._read_at = -float("inf")
    assert encode.threads() == 2
    assert not (tmp_path / f"{pid}-encode.json").exists()  # a dead claim is swept
    language.close()
    encode._read_at = -float("inf")
    assert encode.threads() == 8  # no language service left: every core
    encode.close()
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
