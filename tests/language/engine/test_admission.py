"""Admission control's estimate: requests waiting for a first token over the rate at which they
get one, measured on a clock that runs only while some request waits."""

from __future__ import annotations

import pytest

from services.language.engine.admission import (
    TARGET_SHARE,
    AdmissionControl,
    AdmissionRefusedError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(control: AdmissionControl, clock: Clock, num: int, gap_s: float) -> None:
    """`num` requests, one after another, each getting its first token `gap_s` after arriving."""
    for _ in range(num):
        ticket = control.admit()
        clock.now += gap_s
        ticket.started()
        ticket.close()


def test_refuses_when_the_backlog_would_wait_longer_than_the_bound():
    clock = Clock()
    control = AdmissionControl(max_delay_s=1.05 / TARGET_SHARE, clock=clock)  # up to 1.05 s
    serve(control, clock, 20, 0.1)  # 10 first tokens per busy second
    assert control.estimate_s() == pytest.approx(0.1)
    tickets = [control.admit() for _ in range(10)]  # the 10th waits behind 9: 1.0 s
    with pytest.raises(AdmissionRefusedError, match="of this server's bound of 2.62") as exc:
        control.admit()  # behind 10: 1.1 s
    assert exc.value.estimate_s == pytest.approx(1.1) and exc.value.retry_after_s == 1
    tickets.pop().started()  # one got its first token: room for one more
    tickets.append(control.admit())
    assert control.num_refused == 1


def test_idle_time_does_not_count_against_the_rate():
    clock = Clock()
    control = AdmissionControl(max_delay_s=1.0, clock=clock)
    serve(control, clock, 10, 0.1)
    clock.now += 3600.0  # an hour with nothing to do
    assert control.estimate_s() == pytest.approx(0.1)


def test_a_stall_lowers_the_rate_until_requests_are_refused():
    clock = Clock()
    control = AdmissionControl(max_delay_s=1.0 / TARGET_SHARE, clock=clock)
    serve(control, clock, 10, 0.01)
    waiting = control.admit()
    clock.now += 5.0  # the engine answers nobody for 5 s
    with pytest.raises(AdmissionRefusedError):
        control.admit()
    waiting.close()


def test_without_a_rate_only_a_few_requests_are_let_in():
    control = AdmissionControl(max_delay_s=1.0, cold_start_pending=3, clock=Clock())
    tickets = [control.admit() for _ in range(3)]
    with pytest.raises(AdmissionRefusedError, match="unknown"):
        control.admit()
    for ticket in tickets:
        ticket.close()
    assert control.num_pending == 0


def test_off_admits_everything_and_tickets_close_once():
    clock = Clock()
    control = AdmissionControl(max_delay_s=None, clock=clock)
    tickets = [control.admit() for _ in range(1000)]
    assert control.num_pending == 1000
    for ticket in tickets:
        ticket.started()
        ticket.close()
        ticket.close()
    assert control.num_pending == 0


def test_engine_config_checks_the_bound():
    from services.language.engine import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="--max-queue-delay"):
        EngineConfig(max_queue_delay_s=0)
    with pytest.raises(EngineConfigError, match="--device 'tpu'"):
        EngineConfig(device="tpu")
